"""Budgets and allocations: which sparsity each group gets so that the pruned network keeps a
given fraction of the unpruned MACs, parameters or channels.

An allocation is a plan {group index: sparsity}, the currency of `api.compress`. Internally the
solvers work with kept channel counts per group (`kept`), which is what fixes the cost:

- `CostModel`: the MACs and parameters of any plan, predicted from per-module costs measured
  once per group with torch-pruning's op counter (the CSV's `macs`); `calibrate` checks the
  prediction on a real pruned copy.
- `uniform`: one sparsity for every group, bisected to meet the budget.
- `global_ranking`: torch-pruning's global pruning: every channel's importance is normalized by
  the mean of its group (torch-pruning's default "mean" normalizer), all channels are ranked
  together and the least important go, the threshold bisected to meet the budget.
- `sensitivity`: each group pruned alone at a ladder of sparsities with the chosen method
  (`measure_profile`, on held-out *training* images through the data-major evaluator);
  `solve` then picks the per-group sparsities of least predicted loss under the budget.
  `iterative_solve` re-measures the next step of every group on the current plan after each step.

The predicted loss is the increase of the mean cross-entropy on the held-out images, summed over
groups. Cross-entropy rather than the accuracy drop: on a thousand images the accuracy moves in
steps of 0.1 pt and single-group drops are not even monotone in the sparsity (measured), so the
solve would chase noise; the cross-entropy is continuous, sees a confident error growing before
it flips a prediction, and unlike the KL to the unpruned outputs it does not penalize a change
that makes the network more right on the labels.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from .errors import IntraFusionError
from .groups import Pruner, count_macs_params, kept_count
from .importance import Scorer

ALLOCATIONS = ("uniform", "global", "sensitivity")
BUDGETS = ("sparsity", "macs", "params")
LADDER = (0.2, 0.4, 0.6, 0.8)   # sparsities at which each group is profiled
TOLERANCE = 0.01                # a met budget: between budget − 1% and budget (of the unpruned cost)


def group_widths(pruner: Pruner) -> list[int]:
    """Out-channel count of each group's root, in group order."""
    return [pruner.full_group(g.index)[1] for g in pruner.groups]


def sparsity_of(n: int, kept: int) -> float:
    """The sparsity s for which groups.kept_count(n, s) == kept (s = (n − kept)/n, nudged below
    by floating point where int(n·(1 − s)) would round down)."""
    s = (n - kept) / n
    while kept_count(n, s) < kept:
        s = math.nextafter(s, -math.inf)
    return max(s, 0.0)


def snap(n: int, kept: int, round_to: int | None) -> int:
    """`kept` rounded to the nearest multiple of round_to (at least round_to, at most n), as
    torch-pruning's round_to keeps widths; at least 1 channel."""
    if round_to and round_to > 1 and n > round_to:
        kept = min(n, max(round_to, round_to * round(kept / round_to)))
    return min(n, max(1, kept))


def check_budget(kind: str, value: float) -> None:
    """IntraFusionError unless kind is a BUDGETS name and 0 < value < 1."""
    if kind not in BUDGETS:
        raise IntraFusionError(f"unknown budget {kind!r}; choose one of {', '.join(BUDGETS)}")
    if not 0 < value < 1:
        raise IntraFusionError(f"{kind} budget {value} outside (0, 1): pass the fraction to keep "
                               "(macs, params) or to prune (sparsity), e.g. 0.5")


def one_budget(**given) -> tuple[str, object]:
    """(kind, value) of the one budget among `given` (sparsity=, macs=, params=) that is not
    None; IntraFusionError naming them when none or several are."""
    named = [(k, v) for k, v in given.items() if v is not None]
    if not named:
        raise IntraFusionError(f"no {next(iter(given))} given: pass one of {', '.join(given)}")
    if len(named) > 1:
        raise IntraFusionError(f"give only one of {', '.join(given)}, not {' and '.join(k for k, _ in named)}")
    return named[0]


def _leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if not list(m.children())}


def layer_costs(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{leaf module name: (ops, params)} as torch-pruning's op counter counts them."""
    _, _, ops, params = tp.utils.count_ops_and_params(model, example_input, layer_wise=True)
    return {n: (float(ops.get(m, 0)), float(params.get(m, 0))) for n, m in _leaves(model).items()}


Poly = tuple[float, float, float]   # (a0, a1, a2): a0 + a1·f + a2·f², 1 at f = 1


@dataclass(frozen=True)
class CostModel:
    """MACs and parameters of a plan, from per-module costs of the unpruned network and how each
    module's cost scales with the kept fraction f_g of each group: cost_m · Π_g p_mg(f_g), with
    p_mg a polynomial of degree 2 (1 at f = 1).

    This is exact for what torch-pruning's counter counts: a conv's MACs are out·(in·k² + 1 for
    its bias) = f_out · (A·f_in + B); a BN's, a ReLU's or a pooling's scale with one width; a
    layer whose in- and out-channels belong to one group scales with f². The polynomials are
    measured (group g pruned alone to two widths), so any architecture is covered."""

    widths: tuple[int, ...]
    terms: tuple[tuple[float, float, tuple[tuple[int, Poly, Poly], ...]], ...]  # ops, params, ((g, p_ops, p_params),)
    fixed: tuple[float, float]  # what the op counter counts outside leaf modules

    def cost(self, kept: dict[int, int], kind: str) -> float:
        """Predicted MACs ("macs"), parameters ("params") or kept channels ("sparsity") of the
        network with kept[g] channels in each group g (unlisted groups unpruned)."""
        if kind == "sparsity":
            return float(sum(kept.get(g, n) for g, n in enumerate(self.widths)))
        which = 0 if kind == "macs" else 1
        total = self.fixed[which]
        for *cost, polys in self.terms:
            factor = 1.0
            for g, *poly in polys:
                if g in kept:
                    a0, a1, a2 = poly[which]
                    f = kept[g] / self.widths[g]
                    factor *= a0 + a1 * f + a2 * f * f
            total += cost[which] * factor
        return total

    def base(self, kind: str) -> float:
        return self.cost({}, kind)

    def fraction(self, kept: dict[int, int], kind: str) -> float:
        """cost(kept) / unpruned cost."""
        return self.cost(kept, kind) / self.base(kind)


def fit_poly(points: list[tuple[float, float]]) -> Poly:
    """(a0, a1, a2) through (1, 1) and the measured (f, ratio) points: a parabola through two,
    a line through one (a group too narrow to be measured twice)."""
    if len(points) == 1:
        (f, r), = points
        a1 = (1 - r) / (1 - f)
        return (1 - a1, a1, 0.0)
    (f1, r1), (f2, r2) = points
    # a1·(f − 1) + a2·(f² − 1) = r − 1 for both points
    m = torch.tensor([[f1 - 1, f1 * f1 - 1], [f2 - 1, f2 * f2 - 1]], dtype=torch.float64)
    a1, a2 = torch.linalg.solve(m, torch.tensor([r1 - 1, r2 - 1], dtype=torch.float64)).tolist()
    return (1 - a1 - a2, a1, a2)


def measure_cost_model(pruner: Pruner, example_input: torch.Tensor) -> CostModel:
    """Fit a CostModel to `pruner`'s network: one layer-wise count of the unpruned network and
    two per group with that group alone pruned (default pruning, l1) to about 1/2 and 1/4."""
    base = layer_costs(pruner.model, example_input)
    macs, params = count_macs_params(pruner.model, example_input)
    widths = group_widths(pruner)
    scorer = Scorer("l1")
    polys: dict[str, list] = {name: [] for name in base}
    for g, n in enumerate(widths):
        points = {name: [] for name in base}
        for k in sorted({max(1, n // 2), max(1, n // 4)} - {n}, reverse=True):
            variant = pruner.copy()
            variant.prune_group(g, sparsity_of(n, k), "default", scorer)
            pruned = layer_costs(variant.model, example_input)
            for name, cost in base.items():
                points[name].append((k / n, [pruned[name][i] / c if c else 1.0 for i, c in enumerate(cost)]))
        for name, pts in points.items():
            if pts and any(abs(r - 1) > 1e-12 for _, ratios in pts for r in ratios):
                polys[name].append((g, *(fit_poly([(f, ratios[i]) for f, ratios in pts]) for i in (0, 1))))
    terms = tuple((ops, par, tuple(polys[name])) for name, (ops, par) in base.items() if ops or par)
    fixed = (macs - sum(t[0] for t in terms), params - sum(t[1] for t in terms))
    return CostModel(tuple(widths), terms, fixed)


def prune_widths(pruner: Pruner, kept: dict[int, int]) -> Pruner:
    """A default-pruned (l1) copy of `pruner` with kept[g] channels in each group: the widths of
    a plan, for counting its real cost."""
    variant, scorer = pruner.copy(), Scorer("l1")
    for g, k in kept.items():
        variant.prune_group(g, sparsity_of(variant.full_group(g)[1], k), "default", scorer)
    return variant


def plan_from_widths(pruner: Pruner, pruned: nn.Module) -> dict[int, float]:
    """The {group: sparsity} plan that turned `pruner`'s unpruned network into `pruned`, read off
    the width of each group's root layer."""
    modules = dict(pruned.named_modules())
    plan = {}
    for g, n in zip(pruner.groups, group_widths(pruner)):
        root = modules[g.root]
        plan[g.index] = sparsity_of(n, root.out_features if isinstance(root, nn.Linear) else root.out_channels)
    return plan


def kept_of(model: CostModel, plan: dict[int, float]) -> dict[int, int]:
    """Kept channels of each group of a {group: sparsity} plan."""
    return {g: kept_count(model.widths[g], s) for g, s in plan.items()}


def plan_of(model: CostModel, kept: dict[int, int]) -> dict[int, float]:
    """The {group: sparsity} plan that keeps kept[g] channels."""
    return {g: sparsity_of(model.widths[g], k) for g, k in kept.items()}


def _unreachable(kind: str, budget: float, least: float) -> IntraFusionError:
    return IntraFusionError(f"{kind} budget {budget} is unreachable: pruning every allowed group "
                            f"as far as this allocation can leaves {least:.3f} of the unpruned {kind}")


def _target(kind: str, budget: float) -> float:
    """The cost fraction to meet: budget of MACs/params kept, or 1 − sparsity of channels."""
    return 1 - budget if kind == "sparsity" else budget


def _bisect(kept_at, fraction, target: float, steps: int = 60) -> dict[int, int]:
    """kept_at(t) for the smallest t in [0, 1] with fraction(kept_at(t)) <= target (kept_at
    prunes more as t grows; fraction is non-increasing in t)."""
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if fraction(kept_at(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return kept_at(hi)


def uniform(model: CostModel, groups, kind: str, budget: float, round_to: int | None = None) -> dict[int, int]:
    """Kept channels per group at one common sparsity, the least one that meets the budget."""
    target = _target(kind, budget)
    kept_at = lambda s: {g: snap(model.widths[g], kept_count(model.widths[g], min(s, 1 - 1e-9)), round_to)
                         for g in groups}  # noqa: E731
    least = model.fraction(kept_at(1.0), kind)
    if least > target:
        raise _unreachable(kind, budget, least)
    return _bisect(kept_at, lambda k: model.fraction(k, kind), target)


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
    target = _target(kind, budget)

    def kept_at(t: float) -> dict[int, int]:
        pruned = torch.bincount(order[: int(t * len(order))], minlength=len(scores)).tolist()
        return {g: snap(len(s), len(s) - p, round_to) for (g, s), p in zip(scores.items(), pruned)}

    least = model.fraction(kept_at(1.0), kind)
    if least > target:
        raise _unreachable(kind, budget, least)
    return _bisect(kept_at, lambda k: model.fraction(k, kind), target)


Profile = dict[int, list[tuple[float, float]]]  # group -> [(sparsity, predicted loss)], ladder order


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
    target = _target(kind, budget)
    curves = {g: loss_curve(pts, model.widths[g], round_to) for g, pts in profile.items()}
    options = {g: sorted(c, reverse=True) for g, c in curves.items()}
    options = {g: ks[::max(1, len(ks) // steps)] + ([ks[-1]] if len(ks) > steps else []) for g, ks in options.items()}
    kept = {g: ks[0] for g, ks in options.items()}
    least = model.fraction({g: ks[-1] for g, ks in options.items()}, kind)
    if least > target:
        raise _unreachable(kind, budget, least)
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


def calibrate(pruner: Pruner, model: CostModel, example_input, kind: str, budget: float,
              allocate, attempts: int = 8, reference: tuple[int, int] | None = None) -> dict[int, int]:
    """allocate(target budget) -> kept, checked with a real count (torch-pruning's op counter
    on a default-pruned copy) and re-solved with the target scaled by asked/real (bisected once
    bracketed) until the real cost is within [budget − TOLERANCE, budget]; the best plan found otherwise.

    reference: the (MACs, params) the budget is a fraction of, default those of pruner's folded
    network (the unfolded original counts fewer when folding gave its convolutions a bias)."""
    if kind == "sparsity":
        return allocate(budget)
    which = 0 if kind == "macs" else 1
    real_base = (reference or count_macs_params(pruner.model, example_input))[which]
    asked, best, low, high = budget, None, None, None
    for _ in range(attempts):
        kept = allocate(asked)
        counted = count_macs_params(prune_widths(pruner, kept).model, example_input)
        real = counted[which] / real_base
        if real <= budget and (best is None or real > best[0]):
            best = (real, kept)
        if budget - TOLERANCE <= real <= budget:
            return kept
        if real <= budget:
            low = asked if low is None else max(low, asked)
        else:
            high = asked if high is None else min(high, asked)
        scaled = min(asked * budget / real, 1 - 1e-9)
        asked = (low + high) / 2 if low is not None and high is not None and not low < scaled < high else scaled
    if best is None:
        raise IntraFusionError(f"could not meet the {kind} budget {budget}: the closest plan keeps "
                               f"{real:.4f}")
    return best[1]


class HeldOutLoss:
    """Mean cross-entropy of pruned copies of `base` on held-out images (N, 3, H, W) and labels
    (N,), through the data-major evaluator (experiments/prefix.py: the unpruned network runs once
    per batch and each variant only from its first changed layer on)."""

    def __init__(self, base: Pruner, images: torch.Tensor, labels: torch.Tensor):
        from .experiments.prefix import GridEvaluator
        self.evaluator = GridEvaluator(base, images, labels)
        self.base = base

    @property
    def unpruned(self) -> float:
        """The unpruned network's loss (from the first pass)."""
        return self.evaluator.unpruned("cross_entropy")

    def hold(self, variant: Pruner) -> Pruner:
        """`variant`, sharing its unchanged tensors with the base while it waits to be evaluated
        (it must not be trained afterwards)."""
        from .experiments.prefix import share_unchanged
        share_unchanged(self.base.model, variant.model)
        return variant

    def losses(self, variants: list[Pruner]) -> list[float]:
        """The loss of each variant, all evaluated in one pass over the images."""
        return self.evaluator.evaluate(variants, "cross_entropy")

    def __call__(self, variant: Pruner) -> float:
        return self.losses([variant])[0]


def measure_profile(base: Pruner, prune, loss: HeldOutLoss, groups, ladder=LADDER) -> Profile:
    """{group: [(s, loss(s) − loss(unpruned))]}: each group pruned alone at each ladder sparsity
    by prune(variant, group, sparsity) (the method, with its repair), rungs a group cannot take
    (no channel, or no attention head, left: Pruner.check_prunable) skipped. The rungs of a
    group are evaluated together, in one pass over the held-out images."""
    profile: Profile = {}
    for g in groups:
        rungs, variants = [], []
        with base.keeping_distances():
            for s in ladder:
                try:
                    base.check_prunable(g, s)
                except IntraFusionError:
                    continue
                variant = base.copy()
                prune(variant, {g: s})
                rungs.append(s)
                variants.append(loss.hold(variant))
        profile[g] = [(s, value - loss.unpruned) for s, value in zip(rungs, loss.losses(variants))]
    return profile


def iterative_solve(base: Pruner, model: CostModel, prune, loss: HeldOutLoss, groups, kind: str,
                    budget: float, ladder=LADDER, round_to: int | None = None) -> dict[int, int]:
    """Greedy with re-measurement: from the unpruned network, measure for every group the loss of
    its next ladder rung on top of the current plan (all groups pruned together), take the rung
    of least measured loss increase per cost saved, and repeat until the budget is met; the last
    step is then cut back to the least sparsity that meets the budget. Costs one prune and evaluation per group and
    step (much more than `measure_profile`)."""
    target = _target(kind, budget)
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
            raise _unreachable(kind, budget, model.fraction(kept_of(model, plan), kind))
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
    return _bisect(kept_at, lambda k: model.fraction(k, kind), target)


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' shapes and bytes (the held-out images, a model's state)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def profile_key(settings: dict) -> str:
    """The cache key of a profile: sha256 of its settings (model digest, method, criterion,
    fusion settings, ladder, held-out and calibration digests) as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def read_profile(path: Path | str | None, key: str) -> Profile | None:
    """The cached profile of `key` in the JSON file `path`, or None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        entry = json.loads(Path(path).read_text()).get(key)
    except (OSError, ValueError):
        return None
    if not entry:
        return None
    return {int(g): [tuple(p) for p in pts] for g, pts in entry["profile"].items()}


def write_profile(path: Path | str | None, key: str, settings: dict, profile: Profile, seconds: float,
                  cpu_seconds: float = 0.0) -> None:
    """Add (or replace) the profile of `key` in the JSON cache `path`, atomically."""
    if path is None:
        return
    from .storage import atomic_write
    path = Path(path)
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    cache[key] = {"settings": settings, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                  "profile": {str(g): [list(p) for p in pts] for g, pts in profile.items()}}
    atomic_write(path, json.dumps(cache, indent=1, default=str).encode(), "rerun to measure it again")


def cached_profile(cache: Path | str | None, settings: dict, measure) -> tuple[Profile, float, float]:
    """(profile, wall seconds, CPU seconds spent measuring): from the cache when it holds
    `settings` (0, 0), else measure() and stored. CPU seconds (all threads of this process) are
    what a shared machine cannot inflate by making the process wait."""
    key = profile_key(settings)
    profile = read_profile(cache, key)
    if profile is not None:
        return profile, 0.0, 0.0
    start, cpu = time.perf_counter(), time.process_time()
    profile = measure()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    write_profile(cache, key, settings, profile, seconds, cpu)
    return profile, seconds, cpu


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
             cost: CostModel | None = None, reference: tuple[int, int] | None = None) -> Allocation:
    """Per-group sparsities of `groups` meeting a `kind` budget (BUDGETS) with `allocation`.

    scorer: the criterion (global ranks its normalized scores); prune(variant, plan): the method
    applied to a copy of `base`, repair included (sensitivity measures with it); held_out:
    (images, labels) training images never used for calibration (sensitivity); cache: a JSON
    file of profiles, keyed by `cache_settings` (what identifies the network, method and data);
    cost: base's measure_cost_model, when already measured; reference: see `calibrate`.
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
                lambda: measure_profile(base, prune, loss, groups, ladder))
            solver = lambda b: solve(model, result.profile, kind, b, round_to)  # noqa: E731
    kept = calibrate(base, model, example_input, kind, budget, solver, reference=reference)
    result.plan, result.predicted = plan_of(model, kept), model.fraction(kept, kind)
    return result
