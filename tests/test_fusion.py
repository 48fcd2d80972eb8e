import pytest
import torch
from torch import nn

from helpers import TinyResNet, TinyVGG, randomize_batchnorms
from intrafusion.fusion import channel_features, fusion_maps, group_slots
from intrafusion.importance import Scorer
from intrafusion.models import build_model
from intrafusion.groups import FusionSettings, Pruner
from intrafusion.transport import transport_map


def pruner_for(make, seed=0, shape=(1, 3, 16, 16)):
    torch.manual_seed(seed)
    return Pruner(randomize_batchnorms(make()), torch.randn(shape))


@pytest.mark.parametrize("make", [TinyVGG, TinyResNet])
@pytest.mark.parametrize("rule", ["fork", "mean"])
@pytest.mark.parametrize("target", ["most_important", "cluster_centroid"])
def test_sparsity_zero_leaves_outputs_unchanged(make, rule, target):
    pruner = pruner_for(make)
    x = torch.randn(4, 3, 16, 16)
    expected = pruner.model(x)
    records = pruner.prune(range(len(pruner.groups)), 0.0, "intra_fusion", Scorer("l1"),
                           FusionSettings(target=target, rule=rule))
    assert all(r.fused and r.kept == r.channels for r in records)
    torch.testing.assert_close(pruner.model(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["vgg11_bn", "resnet18"])
def test_sparsity_zero_on_the_real_models(model_name):
    pruner = pruner_for(lambda: build_model(model_name), shape=(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    expected = pruner.model(x)
    pruner.prune([0, 1, 2, 3], 0.0, "intra_fusion", Scorer("l1"), FusionSettings(rule="fork"))
    torch.testing.assert_close(pruner.model(x), expected, atol=1e-4, rtol=1e-4)


class PickFirstHalf:
    """Importance that keeps channels 0..k-1 (higher score for lower index)."""

    def __call__(self, model, graph, group, n, pristine=True):
        return torch.arange(n, 0, -1).float()


def duplicate_second_half(conv: nn.Conv2d, consumer: nn.Module, k: int):
    """Make channels k..2k-1 exact copies of 0..k-1: same rows, same consumer columns."""
    with torch.no_grad():
        conv.weight[k:2 * k] = conv.weight[:k]
        conv.bias[k:2 * k] = conv.bias[:k]
        w = consumer.weight
        if isinstance(consumer, nn.Linear):
            w = w.view(w.shape[0], conv.out_channels, -1)
        w[:, k:2 * k] = w[:, :k]


@pytest.mark.parametrize("target", ["most_important", "cluster_centroid"])
def test_mean_rule_keeps_outputs_when_pruned_channels_duplicate_kept_ones(target):
    pruner = pruner_for(TinyVGG)
    f = pruner.model.features
    duplicate_second_half(f[4], f[8], 6)
    x = torch.randn(4, 3, 16, 16)
    expected = pruner.model(x)
    pruner.prune_group(1, 0.5, "intra_fusion", PickFirstHalf(), FusionSettings(target=target, rule="mean"))
    assert f[4].out_channels == 6 and f[8].in_channels == 6
    torch.testing.assert_close(pruner.model(x), expected, atol=1e-5, rtol=1e-4)


def test_fork_rule_doubles_duplicated_channels_and_default_loses_them():
    pruner = pruner_for(TinyVGG)
    duplicate_second_half(pruner.model.features[4], pruner.model.features[8], 6)
    x = torch.randn(4, 3, 16, 16)
    expected = pruner.model(x)
    fork, default = pruner.copy(), pruner.copy()
    fork.prune_group(1, 0.5, "intra_fusion", PickFirstHalf(), FusionSettings(rule="fork"))
    default.prune_group(1, 0.5, "default", PickFirstHalf())
    # fork: out rows are summed (2×row) and columns summed too, so outputs differ from the original
    assert not torch.allclose(fork.model(x), expected, atol=1e-3)
    assert not torch.allclose(default.model(x), expected, atol=1e-3)
    w = fork.model.features[4].weight.detach()
    torch.testing.assert_close(w, 2 * pruner.model.features[4].weight.detach()[:6])


def test_fusion_writes_T_rows_and_T_columns():
    pruner = pruner_for(TinyVGG)
    f = pruner.model.features
    w_out, b_out, w_in = f[4].weight.detach().clone(), f[4].bias.detach().clone(), f[8].weight.detach().clone()
    group, n = pruner.full_group(1)
    slots, unfusable = group_slots(pruner.graph, group, n)
    assert not unfusable and {(s.name, s.out) for s in slots} == {("features.4", True), ("features.8", False)}
    scores = Scorer("l1")(pruner.model, pruner.graph, group, n)
    keep = torch.sort(torch.argsort(scores, descending=True)[:6]).values
    T = transport_map(channel_features(slots), keep, scores)
    for rule in ("fork", "mean"):
        variant = pruner.copy()
        variant.prune_group(1, 0.5, "intra_fusion", Scorer("l1"), FusionSettings(rule=rule))
        a_out, a_in = fusion_maps(T, rule)
        vf = variant.model.features
        torch.testing.assert_close(vf[4].weight.detach(), torch.tensordot(a_out, w_out, dims=1))
        torch.testing.assert_close(vf[4].bias.detach(), a_out @ b_out)
        torch.testing.assert_close(vf[8].weight.detach(), torch.einsum("kn,onij->okij", a_in, w_in))
    torch.testing.assert_close(fusion_maps(T, "mean")[0].sum(1), torch.ones(6))


def test_flattened_consumer_columns_are_fused_per_position():
    pruner = pruner_for(TinyVGG)
    lin = pruner.model.classifier.weight.detach().clone().view(10, 16, 4)
    group, n = pruner.full_group(0)
    slots, _ = group_slots(pruner.graph, group, n)
    lin_slot = next(s for s in slots if not s.out)
    torch.testing.assert_close(lin_slot.index, torch.arange(64).view(16, 4))
    scores = Scorer("l1")(pruner.model, pruner.graph, group, n)
    keep = torch.sort(torch.argsort(scores, descending=True)[:12]).values
    T = transport_map(channel_features(slots), keep, scores)          # (12, 16), fork rule
    variant = pruner.copy()
    variant.prune_group(0, 0.25, "intra_fusion", Scorer("l1"))
    # every spatial position p of kept channel j gets Σ_i T_ji · column (i, p)
    expected = torch.einsum("kn,onp->okp", T, lin).reshape(10, 12 * 4)
    torch.testing.assert_close(variant.model.classifier.weight.detach(), expected)


def test_several_groups_are_pruned_in_order_and_rescored():
    pruner = pruner_for(TinyResNet)
    calls = []

    class Recording(PickFirstHalf):
        def __call__(self, model, graph, group, n, pristine=True):
            calls.append((n, pristine))
            return super().__call__(model, graph, group, n, pristine)

    x = torch.randn(2, 3, 16, 16)
    records = pruner.prune([0, 2], 0.5, "intra_fusion", Recording())
    assert [(r.group, r.channels, r.kept) for r in records] == [(0, 16, 8), (2, 8, 4)]
    assert calls == [(16, True), (8, False)]
    assert pruner.model.b2.out_channels == 8 and pruner.model.short[0].out_channels == 8
    assert pruner.model.conv1.out_channels == 4 and pruner.model.a2.out_channels == 4
    assert pruner.model.linear.in_features == 8
    assert pruner.model(x).shape == (2, 10)
