import math

import pytest
import torch
from torch import nn

from helpers import TinyVGG, randomize_batchnorms
from intrafusion.fusion import fusion_maps, shrinkage
from intrafusion.importance import Scorer
from intrafusion.groups import FusionSettings, Pruner


def test_varfix_needs_features():
    with pytest.raises(ValueError, match="features"):
        fusion_maps(torch.eye(3), "varfix")


def test_identity_map_gives_identity_at_sparsity_zero():
    features = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    a_out, a_in = fusion_maps(torch.eye(5), "varfix", features)
    torch.testing.assert_close(shrinkage(torch.eye(5), features), torch.ones(5))
    torch.testing.assert_close(a_out, torch.eye(5))
    torch.testing.assert_close(a_in, torch.eye(5))


def test_shrinkage_is_a_R_a_for_a_hand_example():
    T = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]])
    features = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])   # cosines 1/√2, 0, 1/√2
    r = 1 / math.sqrt(2)
    a = torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]])
    v = 4 / 9 + 1 / 9 + 2 * (2 / 3) * (1 / 3) * r                 # same for both rows
    torch.testing.assert_close(shrinkage(a, features), torch.tensor([v, v]))
    a_out, a_in = fusion_maps(T, "varfix", features)
    torch.testing.assert_close(a_out, a / math.sqrt(v))
    torch.testing.assert_close(a_in, T)


def test_shrinkage_is_floored_for_cancelling_channels():
    a = torch.tensor([[0.5, 0.5]])
    features = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])              # ρ = −1: the average is 0
    assert shrinkage(a, features).abs().item() < 1e-12
    a_out, _ = fusion_maps(a, "varfix", features)
    assert torch.isfinite(a_out).all() and a_out.max() <= 0.5 / math.sqrt(1e-6) + 1e-3


def test_fused_channel_keeps_unit_variance_for_independent_channels():
    """Orthonormal rows of a 1×1 conv turn white noise into independent unit-variance channels;
    averaging shrinks channel j's variance to Σᵢ a_ji², varfix brings it back to 1."""
    g = torch.Generator().manual_seed(0)
    n, d = 6, 8
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    conv = nn.Conv2d(d, n, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(q[:n].view(n, d, 1, 1))
    T = torch.tensor([[1.0, 0.0, 1.0, 0.5, 0.0, 0.0],
                      [0.0, 1.0, 0.0, 0.5, 1.0, 1.0]])
    x = torch.randn(64, d, 24, 24, generator=g)                    # 36864 samples per channel
    features = conv.weight.detach().flatten(1)
    expected_mean_var = (T / T.sum(1, keepdim=True)).square().sum(1)   # (0.36, 0.265…)
    for rule, expected in (("mean", expected_mean_var), ("varfix", torch.ones(2))):
        a_out, _ = fusion_maps(T, rule, features)
        fused = nn.functional.conv2d(x, torch.tensordot(a_out, conv.weight.detach(), dims=1))
        var = fused.transpose(0, 1).flatten(1).var(1)
        torch.testing.assert_close(var, expected, atol=0.03, rtol=0)
    assert expected_mean_var.max() < 0.4


def layer_output(model, layer, x):
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.append(out))
    model(x)
    handle.remove()
    return seen[0].detach()


def rms_std_ratio(make_variant, layer):
    """√(mean channel variance of `layer` after pruning / the same before): how strong a signal
    the next layer sees, compared to the unpruned network."""
    torch.manual_seed(0)
    base = Pruner(randomize_batchnorms(TinyVGG(widths=(16, 32, 16))), torch.randn(1, 3, 16, 16))
    variant = make_variant(base)
    x = torch.randn(64, 3, 16, 16)
    var = lambda t: t.transpose(0, 1).flatten(1).var(1).mean()
    return (var(layer_output(variant.model, layer, x)) / var(layer_output(base.model, layer, x))).sqrt().item()


@pytest.mark.parametrize("rule,low,high", [("fork", 1.3, 1.7), ("mean", 0.6, 0.85), ("varfix", 0.93, 1.07)])
def test_rules_against_each_other_on_a_random_network(rule, low, high):
    """Fusing 32 → 16 nearly uncorrelated channels (measured: fork 1.47, mean 0.74, varfix 1.00):
    fork sums about two channels (×√2), mean averages them (×1/√2), varfix keeps the scale."""
    def prune(base):
        variant = base.copy()
        variant.prune_group(1, 0.5, "intra_fusion", Scorer("l1"), FusionSettings(rule=rule))
        return variant
    assert low < rms_std_ratio(prune, "features.4") < high


def test_varfix_at_sparsity_zero_leaves_the_network_unchanged():
    torch.manual_seed(0)
    pruner = Pruner(randomize_batchnorms(TinyVGG()), torch.randn(1, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    expected = pruner.model(x)
    pruner.prune(range(len(pruner.groups)), 0.0, "intra_fusion", Scorer("l1"), FusionSettings(rule="varfix"))
    torch.testing.assert_close(pruner.model(x), expected, atol=1e-5, rtol=1e-4)
