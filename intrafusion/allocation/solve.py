"""Allocations: which sparsity each group gets under a budget (budget.py), the plan
{group index: sparsity} that `api.compress` takes.

- `uniform`: one sparsity for every group, bisected to meet the budget.
- `global_ranking`: torch-pruning's global pruning: every channel's importance is normalized by
  the mean of its group (torch-pruning's default "mean" normalizer), all channels are ranked
  together and the least important go, the threshold bisected to meet the budget.
- `sensitivity`: `solve` picks the per-group sparsities of least predicted loss under the budget
  from a profile (profile.py), the predicted loss summed over groups; `iterative_solve`
  re-measures the next step of every group on the current plan after each step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IntraFusionError
from ..groups import Pruner, kept_count
from ..importance import Scorer
from .budget import (CostModel, bisect_kept, target_fraction, unreachable, calibrate, check_budget, kept_of,
                     measure_cost_model, plan_of, snap)
from .profile import LADDER, HeldOutLoss, Profile, cached_profile, measure_profile, tensor_digest

ALLOCATIONS = ("uniform", "global", "sensitivity")


def uniform(model: CostModel, groups, kind: str, budget: float, round_to: int | None = None) -> dict[int, int]:
    """Kept channels per group at one common sparsity, the least one that meets the budget."""
    target = target_fraction(kind, budget)
    kept_at = lambda s: {g: snap(model.widths[g], kept_count(model.widths[g], min(s, 1 - 1e-9)), round_to)
                         for g in groups}  # noqa: E731
    least = model.fraction(kept_at(1.0), kind)
    if least > target:
        raise unreachable(kind, budget, least)
    return bisect_kept(kept_at, lambda k: model.fraction(k, kind), target)


def normalized_scores(pruner: Pruner, scorer: Scorer, groups) -> dict[int, torch.Tensor]:
    """{group: importance (n,)} of the unpruned network, each divided by its group's mean
    (torch-pruning's default "mean" normalizer, which makes groups comparable for global ranking)."""
    scores = {}
    for g in groups:
        group, n = pruner.full_group(g)
        s = scorer(pruner.model, pruner.graph, group, n, pristine=pruner.pristine).float().cpu()
        scores[g] = s / s.mean().clamp_min(1e-12)
    return scores


def global_ranking(model: CostModel, scores: dict[int, torch.Tensor], kind: str, budget: float,
                   round_to: int | None = None) -> dict[int, int]:
    """Kept channels per group when the channels of every group, ranked together by their
    normalized scores, go from the least important until the budget is met (each group keeps at
    least one channel, or round_to; ties go in group order, one channel at a time)."""
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores.values())])
    order = owner[torch.argsort(torch.cat(list(scores.values())), stable=True)]  # group of each rank
    target = target_fraction(kind, budget)

    def kept_at(t: float) -> dict[int, int]:
        pruned = torch.bincount(order[: int(t * len(order))], minlength=len(scores)).tolist()
        return {g: snap(len(s), len(s) - p, round_to) for (g, s), p in zip(scores.items(), pruned)}

    least = model.fraction(kept_at(1.0), kind)
    if least > target:
        raise unreachable(kind, budget, least)
    return bisect_kept(kept_at, lambda k: model.fraction(k, kind), target)


def loss_curve(points: list[tuple[float, float]], n: int, round_to: int | None = None
               ) -> dict[int, float]:
    """{kept channels: predicted loss} of one group on every width the profile brackets: linear
    between the ladder's points and (sparsity 0, loss 0), made non-decreasing in the sparsity
    (pruning more is never predicted to help: a dip is noise)."""
    xs = [0.0] + [s for s, _ in points]
    ys = [0.0] + [max(0.0, v) for _, v in points]
    ys = [max(ys[:i + 1]) for i in range(len(ys))]
    curve = {}
    for k in range(n, 0, -1):
        s = (n - k) / n
        if s > xs[-1] + 1e-9:
            break
        i = max(j for j in range(len(xs)) if xs[j] <= s + 1e-12)
        loss = ys[i] if i == len(xs) - 1 else ys[i] + (ys[i + 1] - ys[i]) * (s - xs[i]) / (xs[i + 1] - xs[i])
        k = snap(n, k, round_to)
        curve[k] = min(curve.get(k, math.inf), loss)
    return curve


def solve(model: CostModel, profile: Profile, kind: str, budget: float,
          round_to: int | None = None, steps: int = 40) -> dict[int, int]:
    """Kept channels per profiled group minimizing the summed predicted loss under the budget.

    Greedy on the lower convex hull: from the unpruned network, repeatedly move the one group to
    the narrower width (up to `steps` widths per group, any of them, not just the next) with the
    least predicted loss per unit of cost saved at the current plan, until the budget is met;
    then `refill` gives back what the last move took beyond it."""
    target = target_fraction(kind, budget)
    curves = {g: loss_curve(pts, model.widths[g], round_to) for g, pts in profile.items()}
    options = {g: sorted(c, reverse=True) for g, c in curves.items()}
    options = {g: ks[::max(1, len(ks) // steps)] + ([ks[-1]] if len(ks) > steps else []) for g, ks in options.items()}
    kept = {g: ks[0] for g, ks in options.items()}
    least = model.fraction({g: ks[-1] for g, ks in options.items()}, kind)
    if least > target:
        raise unreachable(kind, budget, least)
    cost = model.fraction(kept, kind)
    while cost > target:
        best = None
        for g, ks in options.items():
            for k in ks:
                if k >= kept[g]:
                    continue
                saved = cost - model.fraction({**kept, g: k}, kind)
                if saved <= 0:
                    continue
                key = ((curves[g][k] - curves[g][kept[g]]) / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, g, k)
        _, g, k = best
        kept[g] = k
        cost = model.fraction(kept, kind)
    return refill(model, curves, kept, kind, target)


def refill(model: CostModel, curves: dict[int, dict[int, float]], kept: dict[int, int], kind: str,
           target: float) -> dict[int, int]:
    """Give channels back while the budget holds, one width step at a time, to the group whose
    predicted loss falls most per unit of cost added: the greedy's last move overshoots the
    budget by up to a whole step, and this lands the plan just under it."""
    kept = dict(kept)
    cost = model.fraction(kept, kind)
    while True:
        best = None
        for g, curve in curves.items():
            wider = min((k for k in curve if k > kept[g]), default=None)
            if wider is None:
                continue
            added = model.fraction({**kept, g: wider}, kind) - cost
            if cost + added > target:
                continue
            key = (-(curve[kept[g]] - curve[wider]) / max(added, 1e-12), added)
            if best is None or key < best[0]:
                best = (key, g, wider)
        if best is None:
            return kept
        _, g, kept[g] = best
        cost = model.fraction(kept, kind)


def iterative_solve(base: Pruner, model: CostModel, prune, loss: HeldOutLoss, groups, kind: str,
                    budget: float, ladder=LADDER, round_to: int | None = None) -> dict[int, int]:
    """Greedy with re-measurement: from the unpruned network, measure for every group the loss of
    its next ladder rung on top of the current plan (all groups pruned together), take the rung
    of least measured loss increase per cost saved, and repeat until the budget is met; the last
    step is then cut back to the least sparsity that meets the budget. Costs one prune and evaluation per group and
    step (much more than `measure_profile`)."""
    target = target_fraction(kind, budget)
    rung = {g: 0 for g in groups}
    plan: dict[int, float] = {}
    current = loss.unpruned
    while True:
        best = None
        for g in groups:
            if rung[g] >= len(ladder):
                continue
            trial = {**plan, g: ladder[rung[g]]}
            kept = {h: snap(model.widths[h], kept_count(model.widths[h], s), round_to) for h, s in trial.items()}
            if min(kept.values()) < 1:
                continue
            saved = model.fraction(kept_of(model, plan), kind) - model.fraction(kept, kind)
            if saved <= 0:
                continue
            variant = base.copy()
            prune(variant, plan_of(model, kept))
            value = loss(variant)
            key = (max(value - current, 0.0) / saved, -saved)
            if best is None or key < best[0]:
                best = (key, g, value, kept)
        if best is None:
            raise unreachable(kind, budget, model.fraction(kept_of(model, plan), kind))
        _, g, value, kept = best
        if model.fraction(kept, kind) <= target:
            fixed = {h: k for h, k in kept.items() if h != g}
            return _finish_last(model, fixed, g, plan.get(g, 0.0), ladder[rung[g]], kind, target, round_to)
        plan[g] = ladder[rung[g]]
        rung[g] += 1
        current = value


def _finish_last(model: CostModel, fixed: dict[int, int], g: int, lo: float, hi: float, kind: str,
                 target: float, round_to: int | None) -> dict[int, int]:
    """`fixed` plus group g at the least sparsity in [lo, hi] that meets the target."""
    n = model.widths[g]
    kept_at = lambda t: {**fixed, g: snap(n, kept_count(n, lo + (hi - lo) * t), round_to)}  # noqa: E731
    return bisect_kept(kept_at, lambda k: model.fraction(k, kind), target)


@dataclass
class Allocation:
    """A solved allocation: the {group: sparsity} plan, its predicted cost fraction, and the
    sensitivity profile with the wall and CPU seconds spent measuring it (0 when cached; None,
    0 otherwise)."""

    plan: dict[int, float]
    predicted: float
    profile: Profile | None = None
    profile_seconds: float = 0.0
    profile_cpu_seconds: float = 0.0


def allocate(base: Pruner, example_input: torch.Tensor, groups, kind: str, budget: float,
             allocation: str = "uniform", *, scorer: Scorer | None = None, prune=None,
             held_out=None, ladder=LADDER, iterative: bool = False, round_to: int | None = None,
             cache: Path | str | None = None, cache_settings: dict | None = None,
             cost: CostModel | None = None, reference: tuple[int, int] | None = None,
             profile_pool=None) -> Allocation:
    """Per-group sparsities of `groups` meeting a `kind` budget (BUDGETS) with `allocation`.

    scorer: the criterion (global ranks its normalized scores); prune(variant, plan): the method
    applied to a copy of `base`, repair included (sensitivity measures with it); held_out:
    (images, labels) training images never used for calibration (sensitivity); cache: a JSON
    file of profiles, keyed by `cache_settings` (what identifies the network, method and data);
    cost: base's measure_cost_model, when already measured; reference: see `calibrate`;
    profile_pool: where the profile's rungs are measured (profile.measure_profile's pool).
    A sparsity budget with `uniform` is exactly that sparsity in every group."""
    check_budget(kind, budget)
    if allocation not in ALLOCATIONS:
        raise IntraFusionError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise IntraFusionError(f"round_to must be a positive integer, got {round_to!r}")
    groups = list(groups)
    if kind == "sparsity" and allocation == "uniform" and not round_to:
        for g in groups:
            base.check_prunable(g, budget)
        return Allocation(dict.fromkeys(groups, budget), 1 - budget)
    if allocation == "sensitivity" and held_out is None:
        raise IntraFusionError("allocation 'sensitivity' needs held-out labeled images: pass held_out=(images, labels)")
    model = cost or measure_cost_model(base, example_input)
    result = Allocation({}, 1.0)
    if allocation == "uniform":
        solver = lambda b: uniform(model, groups, kind, b, round_to)  # noqa: E731
    elif allocation == "global":
        scores = normalized_scores(base, scorer or Scorer("l1"), groups)
        solver = lambda b: global_ranking(model, scores, kind, b, round_to)  # noqa: E731
    else:
        loss = HeldOutLoss(base, *held_out)
        if iterative:
            solver = lambda b: iterative_solve(base, model, prune, loss, groups, kind, b, ladder, round_to)  # noqa: E731
        else:
            settings = {**(cache_settings or {}), "ladder": list(ladder), "groups": groups,
                        "held_out": tensor_digest(*held_out)}
            result.profile, result.profile_seconds, result.profile_cpu_seconds = cached_profile(
                cache if cache_settings else None, settings,
                lambda known, record: measure_profile(base, prune, loss, groups, ladder, known, record,
                                                      profile_pool))
            solver = lambda b: solve(model, result.profile, kind, b, round_to)  # noqa: E731
    kept = calibrate(base, model, example_input, kind, budget, solver, reference=reference)
    result.plan, result.predicted = plan_of(model, kept), model.fraction(kept, kind)
    return result
