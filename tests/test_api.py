"""intrafusion.compress: a new, ordinary, smaller network; the model passed in is untouched."""
import copy
import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn

import intrafusion
from helpers import TinyResNet, randomize_batchnorms
from intrafusion.groups import FusionSettings, Pruner
from intrafusion.importance import Scorer
from intrafusion.models import MLPMixerSmall, MobileNetV2Small
from intrafusion.repair import repair_pruned


class UserNet(nn.Module):
    """A network the library was not written for: a residual block, a concatenation, BN and a
    Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.side = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.cat([x, self.side(x)], 1)
        return self.head(x.mean((2, 3)))


def user_net():
    torch.manual_seed(0)
    return randomize_batchnorms(UserNet())


X = torch.randn(8, 3, 16, 16)
CALIBRATION = [(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))) for _ in range(2)]


def folded_pruned(model, sparsity, method="intra_fusion", criterion="l1", batches=None):
    """The reference: the library's own Pruner, every group pruned in paper order."""
    base = Pruner(copy.deepcopy(model), X[:1])
    pruner = base.copy()
    pruner.prune(range(len(base.groups)), sparsity, "intra_fusion" if "intra" in method else "default",
                 Scorer(criterion, batches), FusionSettings())
    if method.endswith("repair"):
        repair_pruned(base, pruner, batches)
    return pruner.model


def params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ["default", "intra_fusion", "intra_fusion_repair"])
@pytest.mark.parametrize("make", [user_net, lambda: randomize_batchnorms(TinyResNet())])
def test_eval_equals_folded_pruned_network(make, method):
    model = make()
    small = intrafusion.compress(model, X[:1], sparsity=0.5, method=method, calibration=CALIBRATION)
    assert params(small) < 0.5 * params(model)
    assert not small.training
    reference = folded_pruned(model, 0.5, method, batches=CALIBRATION)
    with torch.no_grad():
        assert torch.allclose(small(X), reference(X), atol=1e-5)


def test_model_is_untouched_and_sparsity_zero_changes_nothing():
    model = user_net()
    state = copy.deepcopy(model.state_dict())
    expected = model(X)
    same = intrafusion.compress(model, X[:1], sparsity=0.0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert params(same) == params(model)
    with torch.no_grad():
        assert torch.allclose(same(X), expected, atol=1e-5)
        assert torch.allclose(model(X), expected)


def test_batchnorms_are_real_in_train_mode():
    """Folded BNs get the statistics of their input on the calibration data: train mode on that
    data computes what eval mode does, and an SGD step trains the network."""
    model = user_net()
    small = intrafusion.compress(model, X[:1], sparsity=0.5, calibration=[x for x, _ in CALIBRATION])
    bns = [m for m in small.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4 and all(not torch.allclose(bn.running_var, 1 - bn.eps * torch.ones_like(bn.running_var))
                                 for bn in bns)
    data = torch.cat([x for x, _ in CALIBRATION])
    with torch.no_grad():
        evaluated = small(data)
        trained = copy.deepcopy(small).train()(data)
    assert torch.allclose(trained, evaluated, atol=1e-3, rtol=1e-3)
    small.train()
    optimizer = torch.optim.SGD(small.parameters(), lr=0.1)
    x, y = CALIBRATION[0]
    loss = nn.functional.cross_entropy(small(x), y)
    loss.backward()
    optimizer.step()
    small.eval()
    with torch.no_grad():
        after = small(data)
        assert torch.isfinite(after).all() and (after - evaluated).abs().max() > 1e-3
        assert nn.functional.cross_entropy(small(x), y) < loss


def test_data_free_statistics_come_from_the_unpruned_batchnorms():
    """Without calibration, at sparsity 0 every BN gets back its original output statistics:
    mean β and variance γ²σ²/(σ²+eps)."""
    model = user_net()
    small = intrafusion.compress(model, X[:1], sparsity=0.0, method="default")
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            new = small.get_submodule(name)
            var = bn.weight.detach().square() * bn.running_var / (bn.running_var + bn.eps)
            assert torch.allclose(new.running_mean, bn.bias.detach())
            assert torch.allclose(new.running_var, var)
            assert torch.allclose(new.weight, (var + bn.eps).sqrt())


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=0.5, method="intra_fusion_repair"), "needs calibration"),
    (dict(sparsity=0.5, criterion="chip"), "needs calibration"),
    (dict(sparsity=0.5, criterion="taylor"), "needs calibration"),
    (dict(sparsity=0.5, criterion="taylor", calibration=[X]), r"\(input, target\) pairs"),
    (dict(sparsity=0.5, method="prune_harder"), "unknown method"),
    (dict(sparsity=0.5, criterion="l3"), "unknown criterion"),
    (dict(sparsity=0.5, groups=[99]), "out of range"),
    (dict(sparsity=0.5, groups=[]), "no group"),
    (dict(sparsity=1.0), r"outside \[0, 1\)"),
    (dict(sparsity=-0.1), r"outside \[0, 1\)"),
    (dict(), "no sparsity"),
    (dict(sparsity=0.99), "no channel"),
    (dict(sparsity=0.5, rule="median"), "unknown fusion rule"),
    (dict(sparsity=0.5, taget="most_important"), "unknown fusion option"),
    (dict(sparsity=0.5, p=0), "p must be positive"),
    (dict(sparsity=0.5, ignored_layers=[nn.Linear(2, 2)]), "not a module of the model"),
])
def test_errors(kwargs, message):
    with pytest.raises(intrafusion.IntraFusionError, match=message) as info:
        intrafusion.compress(user_net(), X[:1], **kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_sparsity_is_keyword_only():
    with pytest.raises(TypeError):
        intrafusion.compress(user_net(), X[:1], 0.5)


def test_ignored_layers_keep_their_width_and_groups_choose():
    model = user_net()
    small = intrafusion.compress(model, X[:1], sparsity=0.5, ignored_layers=[model.side[0]])
    assert small.side[0].out_channels == 8 and small.stem[0].out_channels == 8
    one = intrafusion.compress(model, X[:1], sparsity=0.5, groups=[0])
    widths = [m.out_channels for m in one.modules() if isinstance(m, nn.Conv2d)]
    assert sorted(widths) == [4, 16, 16, 16]  # group 0 is `side` (the last prunable group)


def test_torch_pruning_importance_object():
    model = user_net()
    l2 = tp.importance.MagnitudeImportance(p=2, normalizer=None, target_types=[nn.Conv2d, nn.Linear])
    by_object = intrafusion.compress(model, X[:1], sparsity=0.5, criterion=l2)
    by_name = intrafusion.compress(model, X[:1], sparsity=0.5, criterion="l2")
    with torch.no_grad():
        assert torch.equal(by_object(X), by_name(X))
    other = intrafusion.compress(model, X[:1], sparsity=0.5, criterion=tp.importance.RandomImportance())
    assert params(other) == params(by_name)


@pytest.mark.parametrize("make", [MobileNetV2Small, MLPMixerSmall])
def test_extra_architectures_compress(make):
    torch.manual_seed(0)
    model = randomize_batchnorms(make())
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = intrafusion.compress(model, x[:1], sparsity=0.5)
        same = intrafusion.compress(model, x[:1], sparsity=0.0)
    assert params(small) < 0.6 * params(model)
    with torch.no_grad():
        assert small(x).shape == (2, 10) and torch.isfinite(small(x)).all()
        assert torch.allclose(same(x), model(x), atol=1e-5)


def test_compressed_user_model_saves_and_loads_into_a_fresh_instance(tmp_path):
    model = user_net()
    small = intrafusion.compress(model, X[:1], sparsity=0.5, calibration=[x for x, _ in CALIBRATION])
    intrafusion.save(small, tmp_path / "small.pt")
    again = intrafusion.load(tmp_path / "small.pt", model=UserNet())
    with torch.no_grad():
        assert torch.equal(again.eval()(X), small(X))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), small.state_dict().values()))
