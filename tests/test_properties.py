"""Properties of pruning on random small CNNs (plain and residual; random widths; with and without
BN and bias), random groups and sparsities, both fusion rules and both targets. Fuzzing: the
whole file is in the slow tier."""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from torch import nn

from helpers import randomize_batchnorms
from intrafusion.fusion import FUSION_RULES, group_slots
from intrafusion.importance import Scorer
from intrafusion.groups import PRUNING, FusionSettings, Pruner, kept_count
from intrafusion.transport import TARGETS

pytestmark = pytest.mark.slow
SIZE, CLASSES = 8, 5
PROPERTY = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def norm(bn: bool, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if bn else nn.Identity()


class Plain(nn.Module):
    """conv[-BN]-ReLU per width, a max-pool, then a linear head on the flattened or averaged map."""

    def __init__(self, widths, bn, bias, flatten):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=bias), norm(bn, w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers, nn.MaxPool2d(2))
        self.flatten = flatten
        self.classifier = nn.Linear(c * (SIZE // 2) ** 2 if flatten else c, CLASSES)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1) if self.flatten else x.mean((2, 3))
        return self.classifier(x)


class Block(nn.Module):
    def __init__(self, c, w, stride, bn, bias):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, w, 3, stride, 1, bias=bias), norm(bn, w)
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, 1, 1, bias=bias), norm(bn, w)
        self.shortcut = nn.Sequential()
        if stride != 1 or c != w:
            self.shortcut = nn.Sequential(nn.Conv2d(c, w, 1, stride, bias=bias), norm(bn, w))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


class Residual(nn.Module):
    """A stem and residual blocks (identity or projection shortcuts), average pool, linear head."""

    def __init__(self, stem, blocks, bn, bias):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, stem, 3, padding=1, bias=bias), norm(bn, stem)
        layers, c = [], stem
        for w, stride in blocks:
            layers.append(Block(c, w, stride, bn, bias))
            c = w
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(c, CLASSES)

    def forward(self, x):
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(x.mean((2, 3)))


widths = st.integers(2, 8)


@st.composite
def networks(draw) -> Pruner:
    """A folded random network with randomized BN statistics."""
    bn, bias = draw(st.booleans()), draw(st.booleans())
    if draw(st.booleans()):
        model = Plain(draw(st.lists(widths, min_size=1, max_size=3)), bn, bias, draw(st.booleans()))
    else:
        blocks = draw(st.lists(st.tuples(widths, st.sampled_from([1, 2])), min_size=1, max_size=3))
        model = Residual(draw(widths), blocks, bn, bias)
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    return Pruner(randomize_batchnorms(model), torch.randn(1, 3, SIZE, SIZE))


fusions = st.builds(FusionSettings, target=st.sampled_from(TARGETS), rule=st.sampled_from(FUSION_RULES))


@torch.no_grad()
def outputs(pruner: Pruner) -> torch.Tensor:
    return pruner.model(torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))


def assert_same_outputs(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * (1 + float(expected.abs().max())))


def out_channels(pruner: Pruner, index: int) -> set[int]:
    modules = dict(pruner.model.named_modules())
    return {modules[name].out_channels for name in pruner.groups[index].layers}


@PROPERTY
@given(networks(), fusions, st.sampled_from(PRUNING), st.floats(0, 0.9), st.data())
def test_pruned_network_runs_with_the_kept_channel_counts(pruner, fusion, method, sparsity, data):
    chosen = data.draw(st.lists(st.sampled_from(range(len(pruner.groups))), min_size=1,
                                max_size=3, unique=True))
    sizes = {i: out_channels(pruner, i).pop() for i in chosen}
    assume(all(kept_count(n, sparsity) >= 1 for n in sizes.values()))
    records = pruner.prune(chosen, sparsity, method, Scorer("l1"), fusion)
    for record in records:
        assert record.channels == sizes[record.group]
        assert record.kept == kept_count(record.channels, sparsity)
        assert out_channels(pruner, record.group) == {record.kept}
        assert record.fused == (method == "intra_fusion")
    out = outputs(pruner)
    assert out.shape == (3, CLASSES) and torch.isfinite(out).all()


@PROPERTY
@given(networks(), fusions, st.sampled_from(PRUNING))
def test_sparsity_zero_leaves_the_outputs_unchanged(pruner, fusion, method):
    expected = outputs(pruner)
    pruner.prune(range(len(pruner.groups)), 0.0, method, Scorer("l2"), fusion)
    assert_same_outputs(outputs(pruner), expected)


class KeepFirst:
    """Scores that keep channels 0..k-1."""

    def __call__(self, model, graph, group, n, pristine=True):
        return torch.arange(n, 0, -1).float()


@torch.no_grad()
def duplicate(pruner: Pruner, index: int, k: int) -> None:
    """Make every channel j of the group an exact copy of channel j mod k: its out rows and
    biases, and its columns in every consumer."""
    group, n = pruner.full_group(index)
    slots, unfusable = group_slots(pruner.graph, group, n)
    assert not unfusable
    source = torch.arange(n) % k
    for s in slots:
        w = s.module.weight
        if s.out:
            w[s.index] = w[s.index[source]]
            if s.module.bias is not None:
                s.module.bias[s.index] = s.module.bias[s.index[source]]
        else:
            w[:, s.index] = w[:, s.index[source]]


@PROPERTY
@given(networks(), st.sampled_from(TARGETS), st.data())
def test_mean_rule_keeps_outputs_when_pruned_channels_duplicate_kept_ones(pruner, target, data):
    index = data.draw(st.sampled_from(range(len(pruner.groups))))
    n = out_channels(pruner, index).pop()
    k = data.draw(st.sampled_from([d for d in range(1, n) if n % d == 0]))
    duplicate(pruner, index, k)
    expected = outputs(pruner)
    sparsity = 1 - (k + 0.5) / n  # keeps exactly k
    record = pruner.prune_group(index, sparsity, "intra_fusion", KeepFirst(),
                                FusionSettings(target=target, rule="mean"))
    assert record.kept == k and record.fused
    assert_same_outputs(outputs(pruner), expected)
