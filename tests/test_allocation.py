"""Budgets and allocations (intrafusion/allocation.py) on small models: the cost model against
torch-pruning's op counter, each allocation meeting its budget, the sensitivity solve, the
held-out loss through the prefix cache, and the profile cache."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from intrafusion import allocation as A
from intrafusion.errors import IntraFusionError
from intrafusion.groups import Pruner, count_macs_params, kept_count
from intrafusion.importance import Scorer
from intrafusion.models.cifar import VGG, BasicBlock, ResNet

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def small_vgg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = VGG([16, "M", 32, "M", 48, "M", 64, "M", 64, "M"], 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def small_resnet() -> nn.Module:
    torch.manual_seed(1)
    net = ResNet(BasicBlock, [1, 1, 1, 1], 10)
    return net.eval()


@pytest.fixture(scope="module")
def vgg():
    pruner = Pruner(small_vgg(), X, 10)
    return pruner, A.measure_cost_model(pruner, X)


@pytest.fixture(scope="module")
def resnet():
    pruner = Pruner(small_resnet(), X, 10)
    return pruner, A.measure_cost_model(pruner, X)


def real_fraction(pruner, kept, kind):
    which = 0 if kind == "macs" else 1
    return (count_macs_params(A.prune_widths(pruner, kept).model, X)[which]
            / count_macs_params(pruner.model, X)[which])


def test_sparsity_of_inverts_kept_count():
    for n in range(1, 70):
        for k in range(1, n + 1):
            assert kept_count(n, A.sparsity_of(n, k)) == k


def test_snap_keeps_multiples_of_round_to():
    assert A.snap(64, 37, 8) == 40 and A.snap(64, 35, 8) == 32 and A.snap(64, 2, 8) == 8
    assert A.snap(64, 64, 8) == 64 and A.snap(6, 3, 8) == 3 and A.snap(10, 0, None) == 1


@pytest.mark.slow
@pytest.mark.parametrize("net", ["vgg", "resnet"])
def test_cost_model_predicts_the_op_counter(net, request):
    pruner, model = request.getfixturevalue(net)
    assert model.base("macs") == count_macs_params(pruner.model, X)[0]
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        kept = {g: int(torch.randint(1, n + 1, (1,), generator=generator)) for g, n in enumerate(model.widths)}
        for kind in ("macs", "params"):
            assert model.fraction(kept, kind) == pytest.approx(real_fraction(pruner, kept, kind), rel=2e-3)


@pytest.mark.parametrize("kind", ["macs", "params"])
@pytest.mark.parametrize("budget", [0.7, 0.4])
def test_uniform_meets_the_budget_with_one_sparsity(vgg, kind, budget):
    pruner, model = vgg
    kept = A.calibrate(pruner, model, X, kind, budget,
                       lambda b: A.uniform(model, range(len(model.widths)), kind, b))
    assert budget - 0.02 <= real_fraction(pruner, kept, kind) <= budget   # 16-channel groups: coarse steps
    assert len({round(s, 1) for s in A.plan_of(model, kept).values()}) == 1


def test_round_to_keeps_widths_multiples(vgg):
    pruner, model = vgg
    kept = A.uniform(model, range(len(model.widths)), "macs", 0.5, round_to=4)
    assert all(k % 4 == 0 for k in kept.values()) and model.fraction(kept, "macs") <= 0.5


def test_global_prunes_the_lowest_normalized_scores_first():
    linear = (0.0, 1.0, 0.0)
    model = A.CostModel(widths=(4, 4), terms=((100.0, 10.0, ((0, linear, linear),)),
                                              (100.0, 10.0, ((1, linear, linear),))), fixed=(0.0, 0.0))
    low = torch.tensor([1.0, 0.2, 0.3, 2.5]) / 1.0
    scores = {0: low / low.mean(), 1: torch.ones(4)}
    kept = A.global_ranking(model, scores, "macs", 0.75)
    assert kept == {0: 2, 1: 4}   # the two channels below their group's mean go first
    assert A.global_ranking(model, scores, "sparsity", 0.25) == {0: 2, 1: 4}


def test_global_on_a_network_meets_the_budget(resnet):
    pruner, model = resnet
    groups = range(len(model.widths))
    scores = A.normalized_scores(pruner, Scorer("l1"), groups)
    kept = A.calibrate(pruner, model, X, "macs", 0.5, lambda b: A.global_ranking(model, scores, "macs", b))
    assert 0.49 <= real_fraction(pruner, kept, "macs") <= 0.5
    assert len(set(A.plan_of(model, kept).values())) > 1


def test_loss_curve_is_monotone_and_interpolates():
    curve = A.loss_curve([(0.25, 1.0), (0.5, 0.5), (0.75, 3.0)], 8)
    assert curve[8] == 0 and curve[6] == pytest.approx(1.0) and curve[7] == pytest.approx(0.5)
    assert curve[4] == pytest.approx(1.0)          # the dip at 0.5 is raised to 1.0
    assert curve[2] == pytest.approx(3.0) and 1 not in curve   # nothing beyond the ladder


def test_solve_prunes_the_insensitive_group_and_beats_uniform(vgg):
    pruner, model = vgg
    groups = range(len(model.widths))
    profile = {g: [(s, s * (10.0 if g == 1 else 0.1)) for s in A.LADDER] for g in groups}
    kept = A.solve(model, profile, "macs", 0.5)
    assert 0.49 <= model.fraction(kept, "macs") <= 0.5
    plan = A.plan_of(model, kept)
    assert plan[1] == min(plan.values()) < max(plan.values())
    curves = {g: A.loss_curve(profile[g], model.widths[g]) for g in groups}
    predicted = lambda k: sum(curves[g][k[g]] for g in groups)  # noqa: E731
    assert predicted(kept) < predicted(A.uniform(model, groups, "macs", 0.5))


def test_budget_errors(vgg):
    pruner, model = vgg
    for bad in (0, 1, 1.5, -0.2, math.nan):
        with pytest.raises(IntraFusionError, match="outside"):
            A.check_budget("macs", bad)
    with pytest.raises(IntraFusionError, match="unknown budget"):
        A.check_budget("flops", 0.5)
    with pytest.raises(IntraFusionError, match="unreachable"):
        A.uniform(model, [0], "macs", 0.3)  # the last group alone cannot remove 70% of the MACs
    with pytest.raises(IntraFusionError, match="unknown allocation"):
        A.allocate(pruner, X, [0, 1], "macs", 0.5, "random")
    with pytest.raises(IntraFusionError, match="held-out"):
        A.allocate(pruner, X, [0, 1], "macs", 0.5, "sensitivity")


def _cross_entropy(model, images, labels):
    with torch.no_grad():
        return float(F.cross_entropy(model(images), labels))


def test_held_out_loss_and_profile_match_full_forward_passes():
    pruner = Pruner(small_vgg(), X, 10)
    g = torch.Generator().manual_seed(5)
    images, labels = torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g)
    loss = A.HeldOutLoss(pruner, images, labels)
    assert loss.evaluator.segments is not None
    assert loss.unpruned == pytest.approx(_cross_entropy(pruner.model, images, labels), rel=1e-5)
    scorer = Scorer("l1")

    def prune(variant, plan):
        for group, s in plan.items():
            variant.prune_group(group, s, "intra_fusion", scorer)

    profile = A.measure_profile(pruner, prune, loss, [0, 2], ladder=(0.25, 0.5))
    assert sorted(profile) == [0, 2] and [s for s, _ in profile[2]] == [0.25, 0.5]
    variant = pruner.copy()
    prune(variant, {2: 0.5})
    direct = _cross_entropy(variant.model, images, labels) - loss.unpruned
    assert profile[2][1][1] == pytest.approx(direct, rel=1e-4, abs=1e-6)
    # the unpruned loss asked first (a pass of its own), then one pass per group for its rungs
    assert loss.evaluator.stats["passes"] == 1 + 2 and loss.evaluator.stats["suffix"] == 2 * 2


@pytest.mark.slow
def test_sensitivity_allocation_meets_the_budget_and_caches_its_profile(tmp_path):
    pruner = Pruner(small_vgg(), X, 10)
    g = torch.Generator().manual_seed(6)
    held_out = torch.randn(30, 3, 32, 32, generator=g), torch.randint(0, 10, (30,), generator=g)
    scorer, calls = Scorer("l1"), []

    def prune(variant, plan):
        calls.append(plan)
        for group, s in plan.items():
            variant.prune_group(group, s, "intra_fusion", scorer)

    cache = tmp_path / "profiles.json"
    kwargs = dict(scorer=scorer, prune=prune, held_out=held_out, cache=cache,
                  cache_settings={"model": "small_vgg", "method": "intra_fusion"})
    first = A.allocate(pruner, X, range(len(pruner.groups)), "macs", 0.5, "sensitivity", **kwargs)
    measured = len(calls)
    assert measured == len(pruner.groups) * len(A.LADDER) and first.profile_seconds > 0
    kept = {k: kept_count(n, first.plan[k]) for k, n in enumerate(A.group_widths(pruner))}
    assert 0.49 <= real_fraction(pruner, kept, "macs") <= 0.5
    again = A.allocate(pruner, X, range(len(pruner.groups)), "macs", 0.25, "sensitivity", **kwargs)
    assert len(calls) == measured and again.profile_seconds == 0 and again.profile == first.profile
    other = dict(kwargs, cache_settings={"model": "small_vgg", "method": "default"})
    A.allocate(pruner, X, range(len(pruner.groups)), "macs", 0.5, "sensitivity", **other)
    assert len(calls) == 2 * measured   # another method: measured again


@pytest.mark.slow
def test_iterative_allocation_meets_the_budget():
    pruner = Pruner(small_vgg(), X, 10)
    g = torch.Generator().manual_seed(7)
    held_out = torch.randn(20, 3, 32, 32, generator=g), torch.randint(0, 10, (20,), generator=g)
    scorer = Scorer("l1")

    def prune(variant, plan):
        for group, s in plan.items():
            variant.prune_group(group, s, "default", scorer)

    result = A.allocate(pruner, X, range(len(pruner.groups)), "macs", 0.6, "sensitivity", scorer=scorer,
                        prune=prune, held_out=held_out, iterative=True)
    kept = {k: kept_count(n, result.plan[k]) for k, n in enumerate(A.group_widths(pruner))}
    assert 0.59 <= real_fraction(pruner, kept, "macs") <= 0.6
