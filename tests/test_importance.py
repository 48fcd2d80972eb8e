import pytest
import torch

from helpers import TinyResNet, TinyVGG, randomize_batchnorms
from intrafusion import importance
from intrafusion.importance import CRITERIA, Scorer, channel_independence, feature_matrices
from intrafusion.groups import Pruner, kept_count


def make_pruner(make=TinyVGG, seed=0):
    torch.manual_seed(seed)
    model = randomize_batchnorms(make())
    return Pruner(model, torch.randn(1, 3, 16, 16))


def batches(count=2, size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(count)]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("make", [TinyVGG, TinyResNet])
def test_every_criterion_scores_every_channel(criterion, make):
    pruner = make_pruner(make)
    scorer = Scorer(criterion, batches())
    for index in range(len(pruner.groups)):
        group, n = pruner.full_group(index)
        scores = scorer(pruner.model, pruner.graph, group, n)
        assert scores.shape == (n,)
        assert torch.isfinite(scores).all()


def test_l1_is_mean_of_row_and_column_l1_norms():
    pruner = make_pruner()
    group, n = pruner.full_group(1)          # features.4 -> features.8
    out, consumer = pruner.model.features[4], pruner.model.features[8]
    expected = (out.weight.detach().abs().flatten(1).sum(1)
                + consumer.weight.detach().abs().transpose(0, 1).flatten(1).sum(1)) / 2
    torch.testing.assert_close(Scorer("l1")(pruner.model, pruner.graph, group, n), expected)


def test_l_inf_is_mean_of_row_and_column_max():
    pruner = make_pruner()
    group, n = pruner.full_group(1)
    out, consumer = pruner.model.features[4], pruner.model.features[8]
    expected = (out.weight.detach().abs().flatten(1).amax(1)
                + consumer.weight.detach().abs().transpose(0, 1).flatten(1).amax(1)) / 2
    torch.testing.assert_close(Scorer("l_inf")(pruner.model, pruner.graph, group, n), expected)


@pytest.mark.parametrize("criterion", ["taylor", "chip"])
def test_data_criteria_do_not_change_the_model(criterion):
    pruner = make_pruner(TinyResNet)
    pruner.model.train()
    before = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    group, n = pruner.full_group(0)
    Scorer(criterion, batches())(pruner.model, pruner.graph, group, n)
    assert pruner.model.training
    for k, v in pruner.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in pruner.model.parameters())


def test_taylor_matches_weight_times_gradient():
    pruner = make_pruner()
    data = batches(1)
    group, n = pruner.full_group(0)         # features.8 -> classifier
    model = pruner.model.eval()
    loss = torch.nn.functional.cross_entropy(model(data[0][0]), data[0][1])
    loss.backward()
    conv, lin = model.features[8], model.classifier
    row = (conv.weight * conv.weight.grad).abs().flatten(1).sum(1)
    col = (lin.weight * lin.weight.grad).abs().view(10, n, 4).transpose(0, 1).flatten(1).sum(1)
    model.zero_grad(set_to_none=True)
    got = Scorer("taylor", data)(model, pruner.graph, group, n)
    torch.testing.assert_close(got, ((row + col) / 2).detach(), rtol=1e-4, atol=1e-7)


def test_pristine_measurements_are_cached_and_remeasured_after_pruning(monkeypatch):
    calls = []
    real = importance.chip_scores
    monkeypatch.setattr(importance, "chip_scores", lambda m, b: calls.append(m) or real(m, b))
    pruner = make_pruner()
    scorer = Scorer("chip", batches())
    group, n = pruner.full_group(0)
    first = scorer(pruner.model, pruner.graph, group, n)
    torch.testing.assert_close(scorer(pruner.model, pruner.graph, group, n), first)
    assert len(calls) == 1
    variant = pruner.copy()
    variant.prune_group(1, 0.5, "default", scorer)
    group, n = variant.full_group(0)
    again = scorer(variant.model, variant.graph, group, n, pristine=variant.pristine)
    assert len(calls) == 2 and calls[-1] is variant.model   # group 1 was scored from the cache
    fresh = Scorer("chip", batches(), cache=False)(variant.model, variant.graph, group, n)
    torch.testing.assert_close(again, fresh)
    assert not torch.allclose(again, first)  # group 0's inputs changed when group 1 was pruned


def test_channel_independence_of_dependent_and_independent_rows():
    r0, r2 = torch.tensor([3.0, 0.0, 0.0, 4.0]), torch.tensor([0.0, 2.0, 0.0, 0.0])
    a = torch.stack([r0, r0, r2])[None]                                 # (1, 3, 4)
    # rows 0 and 1 are equal: ‖a‖_* = √2·5 + 2; zeroing either leaves 5 + 2; zeroing row 2 leaves √2·5
    expected = torch.tensor([[(2 ** 0.5 - 1) * 5, (2 ** 0.5 - 1) * 5, 2.0]])
    torch.testing.assert_close(channel_independence(a), expected, rtol=1e-5, atol=1e-5)


def test_linear_feature_matrices_put_out_features_first():
    lin = torch.nn.Linear(4, 6)
    tokens = lin(torch.randn(2, 5, 4))                                   # (N, tokens, features)
    a = feature_matrices(lin, tokens)
    assert a.shape == (2, 6, 5) and torch.equal(a[1, 3], tokens[1, :, 3])
    assert feature_matrices(lin, tokens[:, 0]).shape == (2, 6, 1)
    conv = torch.nn.Conv2d(3, 7, 3)
    assert feature_matrices(conv, torch.randn(2, 7, 4, 5)).shape == (2, 7, 20)


def test_kept_count_and_lowest_scores_pruned():
    assert [kept_count(512, s) for s in (0.0, 0.3, 0.5, 0.7)] == [512, 358, 256, 153]
    assert kept_count(10, 0.95) == 0
    pruner = make_pruner()
    group, n = pruner.full_group(2)
    scores = Scorer("l1")(pruner.model, pruner.graph, group, n)
    expected_keep = torch.sort(torch.argsort(scores, descending=True)[:kept_count(n, 0.5)]).values
    kept_rows = pruner.model.features[0].weight.detach()[expected_keep].clone()
    pruner.prune_group(2, 0.5, "default", Scorer("l1"))
    torch.testing.assert_close(pruner.model.features[0].weight.detach(), kept_rows)
