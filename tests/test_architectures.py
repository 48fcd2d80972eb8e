import warnings

import pytest
import torch
from torch import nn

from helpers import randomize_batchnorms
from intrafusion.models.extra import MLPMixerSmall, MobileNetV2Small, pruner_options
from intrafusion.importance import Scorer
from intrafusion.groups import Pruner, kept_count

MODELS = [MobileNetV2Small, MLPMixerSmall]


def make_pruner(make):
    torch.manual_seed(0)
    model = randomize_batchnorms(make())
    return Pruner(model, torch.randn(1, 3, 32, 32), **pruner_options(model))


def out_width(module):
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


@pytest.fixture(scope="module")
def pruners():
    return {make: make_pruner(make) for make in MODELS}


def test_groups_of_both_models(pruners):
    mobile = [set(g.layers) for g in pruners[MobileNetV2Small].groups]
    assert mobile[0] == {"features.8"}                                       # head conv
    assert {"features.6.block.6", "features.7.block.6"} in mobile             # residual stream
    assert {"features.7.block.0", "features.7.block.3"} in mobile             # expand + depthwise
    assert len(mobile) == 8
    mixer = [set(g.layers) for g in pruners[MLPMixerSmall].groups]
    assert mixer == [{"embed", "blocks.0.channel_mlp.2", "blocks.1.channel_mlp.2"},
                     {"blocks.1.channel_mlp.0"}, {"blocks.1.token_mlp.fc1"},
                     {"blocks.0.channel_mlp.0"}, {"blocks.0.token_mlp.fc1"}]


@pytest.mark.filterwarnings("ignore:intra_fusion")
@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_every_group_prunes_at_half(pruners, make, method):
    base = pruners[make]
    x = torch.randn(2, 3, 32, 32)
    for index, info in enumerate(base.groups):
        variant = base.copy()
        record = variant.prune_group(index, 0.5, method, Scorer("l1"))
        assert record.kept == kept_count(record.channels, 0.5)
        for name in info.layers:
            assert out_width(variant.model.get_submodule(name)) == record.kept
        out = variant.model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    variant = base.copy()
    variant.prune(range(len(base.groups)), 0.5, method, Scorer("l1"))
    assert variant.model(x).shape == (2, 10)


@pytest.mark.filterwarnings("ignore:intra_fusion")
def test_which_groups_are_fused(pruners):
    mobile = pruners[MobileNetV2Small].copy()
    records = mobile.prune(range(len(mobile.groups)), 0.5, "intra_fusion", Scorer("l1"))
    for record, info in zip(records, mobile.groups):
        depthwise = [n for n in info.layers if mobile.model.get_submodule(n).groups > 1]
        assert record.fused == (not depthwise) and record.unfusable == depthwise
    mixer = pruners[MLPMixerSmall].copy()
    records = mixer.prune(range(len(mixer.groups)), 0.5, "intra_fusion", Scorer("l1"))
    assert all(r.fused and not r.unfusable for r in records)
    assert set(records[0].index_pruned) == {"norm", "blocks.0.norm1", "blocks.0.norm2",
                                            "blocks.1.norm1", "blocks.1.norm2"}
    assert mixer.model.blocks[0].token_mlp.fc2.out_features == 64          # tokens keep their number
    assert mixer.model.norm.weight.shape == (16,)


def test_unfusable_group_is_pruned_like_default():
    base = make_pruner(MobileNetV2Small)
    index = next(g.index for g in base.groups if "features.7.block.3" in g.layers)
    fused, default = base.copy(), base.copy()
    with pytest.warns(UserWarning, match="depthwise"):
        fused.prune_group(index, 0.5, "intra_fusion", Scorer("l1"))
    default.prune_group(index, 0.5, "default", Scorer("l1"))
    for (name, a), (_, b) in zip(fused.model.state_dict().items(), default.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("make", MODELS)
def test_sparsity_zero_with_intra_fusion_keeps_outputs(pruners, make):
    base = pruners[make]
    x = torch.randn(4, 3, 32, 32)
    variant = base.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = variant.prune(range(len(base.groups)), 0.0, "intra_fusion", Scorer("l1"))
    assert any(r.fused for r in records)
    torch.testing.assert_close(variant.model(x), base.model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make,reason", [(MobileNetV2Small, "depthwise"), (MLPMixerSmall, "LayerNorm")])
def test_the_fallback_is_reported_once_per_pruner_family(make, reason):
    base = make_pruner(make)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for sparsity in (0.3, 0.5):
            for _ in range(3):
                variant = base.copy()
                variant.prune(range(len(base.groups)), sparsity, "intra_fusion", Scorer("l1"))
                variant.copy().prune([0], 0.5, "intra_fusion", Scorer("l1"))
        base.copy().prune(range(len(base.groups)), 0.5, "default", Scorer("l1"))
    messages = [str(w.message) for w in caught if "intra_fusion" in str(w.message)]
    assert len(messages) == 1 and reason in messages[0], messages
    with pytest.warns(UserWarning, match=reason):                  # a new pruner says it again
        make_pruner(make).prune(range(len(base.groups)), 0.5, "intra_fusion", Scorer("l1"))


def test_fixed_layers_are_never_pruned():
    torch.manual_seed(0)
    model = MLPMixerSmall()
    options = pruner_options(model)
    assert options["fixed_layers"] == ["blocks.0.token_mlp.fc2", "blocks.1.token_mlp.fc2"]
    assert pruner_options(MobileNetV2Small()) == {}
    pruner = Pruner(model, torch.randn(1, 3, 32, 32), **options)
    assert all(not any("fc2" in n for n in g.layers) for g in pruner.groups)


def test_chip_scores_token_layers_per_out_feature(pruners):
    """A channel-mixing Linear outputs (N, tokens, features): CHIP must score each out-feature
    by its row in the features × tokens matrix, not sum over features."""
    from intrafusion.importance import channel_independence
    base = pruners[MLPMixerSmall]
    index = next(i for i, g in enumerate(base.groups) if set(g.layers) == {"blocks.0.channel_mlp.0"})
    layer = base.model.get_submodule("blocks.0.channel_mlp.0")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = []
    hook = layer.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    with torch.no_grad():
        base.model.eval()(x)
    hook.remove()
    assert seen[0].dim() == 3
    expected = channel_independence(seen[0].transpose(1, 2)).mean(0)
    group, n = base.full_group(index)
    got = Scorer("chip", [(x, torch.zeros(4, dtype=torch.long))])(base.model, base.graph, group, n)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
