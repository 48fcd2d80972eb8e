"""Budgets and the cost model: what a plan {group index: sparsity} costs, and the plan that
meets a fraction of the unpruned MACs, parameters or channels.

Internally the solvers work with kept channel counts per group (`kept`), which is what fixes the
cost. `CostModel` predicts the MACs and parameters of any plan from per-module costs measured once
per group with torch-pruning's op counter (the CSV's `macs`); `calibrate` checks the prediction on
a real pruned copy and corrects the budget until the real cost meets it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ..errors import IntraFusionError
from ..groups import Pruner, count_macs_params, kept_count
from ..importance import Scorer

BUDGETS = ("sparsity", "macs", "params")
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


def unreachable(kind: str, budget: float, least: float) -> IntraFusionError:
    return IntraFusionError(f"{kind} budget {budget} is unreachable: pruning every allowed group "
                            f"as far as this allocation can leaves {least:.3f} of the unpruned {kind}")


def target_fraction(kind: str, budget: float) -> float:
    """The cost fraction to meet: budget of MACs/params kept, or 1 − sparsity of channels."""
    return 1 - budget if kind == "sparsity" else budget


def bisect_kept(kept_at, fraction, target: float, steps: int = 60) -> dict[int, int]:
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
