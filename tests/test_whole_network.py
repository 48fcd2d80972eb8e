import pytest
import torch
from torch import nn

from helpers import TinyResNet, TinyVGG, randomize_batchnorms
from intrafusion.importance import Scorer
from intrafusion.models import build_model
from intrafusion.groups import Pruner, count_macs_params, kept_count


def out_width(module):
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def test_macs_and_params_of_a_single_conv_and_linear():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    assert count_macs_params(conv, torch.randn(1, 3, 8, 8)) == (8 * 8 * 4 * 27, 4 * 27)
    linear = nn.Linear(5, 3)
    assert count_macs_params(linear, torch.randn(1, 5)) == (5 * 3 + 3, 5 * 3 + 3)


@pytest.mark.parametrize("make,size", [(TinyVGG, 16), (TinyResNet, 16),
                                       pytest.param(lambda: build_model("vgg11_bn"), 32, marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_whole_network_pruning_shrinks_every_group(make, size, method):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    base = Pruner(randomize_batchnorms(make()), x[:1])
    macs, params = count_macs_params(base.model, x[:1])
    assert params == sum(p.numel() for p in base.model.parameters())
    variant = base.copy()
    records = variant.prune(range(len(base.groups)), 0.5, method, Scorer("l1"))
    assert [r.group for r in records] == list(range(len(base.groups)))
    assert all(r.fused == (method == "intra_fusion") for r in records)
    for record, info in zip(records, base.groups):
        assert record.kept == kept_count(record.channels, 0.5)
        for name in info.layers:
            assert out_width(variant.model.get_submodule(name)) == record.kept
            assert len(variant.channel_map[name]) == record.kept
    pruned_macs, pruned_params = count_macs_params(variant.model, x[:1])
    # every conv sees about half its inputs and outputs: roughly a quarter of the MACs remain
    assert 0.15 * macs < pruned_macs < 0.5 * macs and 0.15 * params < pruned_params < 0.5 * params
    assert count_macs_params(base.model, x[:1]) == (macs, params)        # the base is untouched
    out = variant.model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
