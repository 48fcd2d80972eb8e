"""Numerical edge cases fed through the whole method (score, transport, fuse, prune): no NaN.

The group under test is TinyVGG's group 1: features.4 (12 out-channels) feeding features.8.
"""
import itertools

import pytest
import torch

from helpers import TinyVGG, randomize_batchnorms
from intrafusion.fusion import FUSION_RULES
from intrafusion.importance import CRITERIA, Scorer
from intrafusion.groups import FusionSettings, Pruner
from intrafusion.transport import MARGINALS, TARGETS

SETTINGS = [FusionSettings(target, marginal, marginal, 1.0, rule)
            for target, rule, marginal in itertools.product(TARGETS, FUSION_RULES, MARGINALS)]
X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g))]


def pruner(edit) -> Pruner:
    """A folded TinyVGG whose group-1 channels (rows, biases, consumer columns) `edit` changes."""
    torch.manual_seed(0)
    p = Pruner(randomize_batchnorms(TinyVGG()), torch.randn(1, 3, 16, 16))
    f = p.model.features
    with torch.no_grad():
        edit(f[4].weight, f[4].bias, f[8].weight)
    return p


def zero(channels):
    def edit(rows, bias, cols):
        rows[channels], bias[channels], cols[:, channels] = 0, 0, 0
    return edit


def copies(pattern):
    """Channel j becomes a copy of channel pattern[j]."""
    def edit(rows, bias, cols):
        rows.copy_(rows[pattern])
        bias.copy_(bias[pattern])
        cols.copy_(cols[:, pattern])
    return edit


def assert_finite(p: Pruner):
    for name, t in p.model.state_dict().items():
        assert torch.isfinite(t).all(), name
    assert torch.isfinite(p.model(X)).all()


def prune_all_ways(base: Pruner, scorer, sparsity=0.5):
    """Yield (settings, pruned copy) for every target, rule and marginal."""
    for settings in SETTINGS:
        variant = base.copy()
        record = variant.prune_group(1, sparsity, "intra_fusion", scorer, settings)
        assert record.fused and variant.model.features[4].out_channels == record.kept
        yield settings, variant


@pytest.mark.parametrize("channels", [slice(None), slice(0, 6), [1, 4, 7]],
                         ids=["all", "first-half", "scattered"])
@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c != "random"])
def test_all_zero_channels(channels, criterion):
    """Zero feature vectors (L2-normalization of 0), zero scores (importance marginals)."""
    base = pruner(zero(channels))
    for _, variant in prune_all_ways(base, Scorer(criterion, batches())):
        assert_finite(variant)


class Tied:
    """Every channel scores the same."""

    def __call__(self, model, graph, group, n, pristine=True):
        return torch.zeros(n)


class Increasing:
    """Channel j scores j: the last channels are the most important."""

    def __call__(self, model, graph, group, n, pristine=True):
        return torch.arange(n, dtype=torch.float)


def test_tied_scores_keep_the_last_channels():
    """A stable sort breaks ties by position, so all-equal scores keep the channels that
    increasing scores keep (6..11 of 12); with uniform marginals the scores play no other part
    and the pruned networks are identical. Zero scores as importance marginals stay finite."""
    base = pruner(lambda *w: None)
    for (settings, tied), (_, ranked) in zip(prune_all_ways(base, Tied()), prune_all_ways(base, Increasing())):
        assert tied.channel_map["features.4"].tolist() == list(range(6, 12))
        assert_finite(tied)
        if settings.source_prob == settings.target_prob == "uniform":
            torch.testing.assert_close(tied.model(X), ranked.model(X), rtol=0, atol=0)


@pytest.mark.parametrize("criterion", ["l1", "l2", "l_inf", "lamp", "chip"])
def test_identical_channels_tie_and_the_mean_rule_keeps_the_function(criterion):
    """All 12 channels equal: every score ties and cluster_centroid sees one distinct point
    for 6 targets. The mean rule averages equal rows and adds their columns: no change."""
    base = pruner(copies([0] * 12))
    expected = base.model(X)
    for settings, variant in prune_all_ways(base, Scorer(criterion, batches())):
        assert_finite(variant)
        if settings.rule == "mean":
            torch.testing.assert_close(variant.model(X), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_cluster_centroid_with_fewer_distinct_points_than_targets(sparsity):
    """Three distinct channels (sizes 8, 2, 2) and 9, 6 or 3 targets."""
    base = pruner(copies([0, 1, 2, 0, 0, 0, 0, 0, 0, 1, 2, 0]))
    for _, variant in prune_all_ways(base, Scorer("l1"), sparsity):
        assert_finite(variant)


def test_keeping_one_channel_of_a_zero_group():
    base = pruner(zero(slice(None)))
    for _, variant in prune_all_ways(base, Scorer("l2"), sparsity=0.9):
        assert variant.model.features[4].out_channels == 1
        assert_finite(variant)
