"""The public entry points: compress a network of your own, or fuse inside Torch-Pruning's pruner.

`compress` deep-copies the model, folds its BatchNorms, prunes (and fuses) the requested groups,
optionally repairs statistics, and returns an ordinary network: every BN that was folded gets
real statistics again, chosen so that it is the identity on them (see `restore_batchnorms`).
Internally the pruning plan is a {group index: sparsity} map, so budgets that give each group its
own sparsity only need to produce another map.

`fold_batchnorms` and `fuse_group` are the two steps a Torch-Pruning user adds to a
`tp.pruner.BasePruner` loop: fold BN once before the pruner is built, then fuse every group the
interactive `step()` yields before it is pruned.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import torch
import torch_pruning as tp
from torch import nn

from .allocation import allocate, one_budget, tensor_digest
from .decoder import compress_lm, route
from .errors import IntraFusionError
from .folding import conv_bn_pairs, fold_all_batchnorms
from .fusion import group_slots
from .groups import FusionSettings, Pruner, count_macs_params, fuse_channels
from .importance import DATA_CRITERIA, Scorer
from .methods import Method, default_method, get_method
from .models import pruner_options
from .reconstruct import reconstruct_pruned
from .repair import RepairInputs, layer_statistics, reference_statistics, repair_pruned

BnStats = dict[str, tuple[torch.Tensor, torch.Tensor]]


def fusion_settings(options: dict) -> FusionSettings:
    """FusionSettings from keyword options (target, source_prob, target_prob, p, rule, seed)."""
    unknown = sorted(set(options) - set(FusionSettings.__dataclass_fields__))
    if unknown:
        raise IntraFusionError(f"unknown fusion option {unknown[0]!r}; choose from "
                               f"{', '.join(FusionSettings.__dataclass_fields__)}")
    return FusionSettings(**options)


def calibration_pairs(calibration) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The calibration data as a list of (input, target or None) pairs, read once."""
    if calibration is None:
        return []
    return [(b, None) if torch.is_tensor(b) else (b[0], b[1]) for b in calibration]


def make_scorer(criterion, batches) -> Scorer:
    """A Scorer for `criterion` (a name or a torch-pruning Importance) with the calibration data
    it needs; taylor needs targets."""
    if isinstance(criterion, str) and criterion in DATA_CRITERIA and not batches:
        raise IntraFusionError(f"criterion {criterion!r} needs calibration data: pass calibration=")
    if criterion == "taylor" and any(y is None for _, y in batches):
        raise IntraFusionError("criterion 'taylor' needs (input, target) pairs as calibration data")
    return Scorer(criterion, batches or None)


def sparsity_plan(pruner: Pruner, groups, sparsity: float) -> dict[int, float]:
    """{group index: sparsity} for `groups` (None: every prunable group, in paper order), each
    checked against the group's width."""
    if sparsity is None:
        raise IntraFusionError("no sparsity given: pass sparsity=, e.g. 0.5")
    indices = range(len(pruner.groups)) if groups is None else list(groups)
    if not indices:
        raise IntraFusionError("no group given: pass groups=None for every group, or indices")
    for g in indices:
        pruner.check_prunable(g, sparsity)
    return dict.fromkeys(indices, sparsity)


def prune_plan(pruner: Pruner, plan: dict[int, float], method: Method, scorer: Scorer,
               fusion: FusionSettings) -> None:
    """Prune each group of `plan` at its sparsity, in the plan's order, re-scoring each."""
    for index, sparsity in plan.items():
        pruner.prune_group(index, sparsity, method.pruning, scorer, method.fusion(fusion))


def batchnorm_statistics(model: nn.Module) -> BnStats:
    """{BN name: (mean, var)} (C,) of each BN's output on the data its running statistics come
    from: mean β, variance γ²σ²/(σ²+eps) (the folded layer's output; data-free). Read before
    folding."""
    stats = {}
    for name, bn in model.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
            var = bn.running_var.detach().clone()
            gamma = bn.weight.detach() if bn.affine else torch.ones_like(var)
            beta = bn.bias.detach().clone() if bn.affine else torch.zeros_like(var)
            stats[name] = (beta, gamma.square() * var / (var + bn.eps))
    return stats


@torch.no_grad()
def restore_batchnorms(pruner: Pruner, unpruned: BnStats, batches=()) -> None:
    """Give every folded BN of `pruner.model` real statistics (m, v) per kept channel and the
    affine map that undoes them: running_mean = m, running_var = v, weight = √(v+eps), bias = m.

    In eval mode the BN computes (x−m)/√(v+eps)·√(v+eps)+m = x, the folded network's function;
    in train mode it normalizes with batch statistics and maps back to scale √v and shift m, like
    any BN (and equals eval mode on a batch whose statistics are (m, v)). (m, v) are measured on
    the calibration `batches` when given (the pruned layer's real output), else taken data-free
    from `unpruned` (batchnorm_statistics of the original model) at each kept channel's original
    index (Pruner.channel_map). A BN without affine parameters keeps its folded statistics
    (mean 0, variance 1−eps): it is the identity in eval mode and normalizes in train mode, as the
    original non-affine BN did."""
    names = pruner.graph._module2name
    pairs = [(names[layer], names[bn], bn) for layer, bn in conv_bn_pairs(pruner.graph) if bn.affine]
    measured = layer_statistics(pruner.model, [p[0] for p in pairs], batches) if batches else {}
    for layer, name, bn in pairs:
        if layer in measured:
            mean, var = measured[layer]
        else:
            mean, var = (t[pruner.channel_map[layer]] for t in unpruned[name])
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_((var + bn.eps).sqrt())
        bn.bias.copy_(mean)


def _layer_names(model: nn.Module, modules) -> list[str]:
    names = {m: n for n, m in model.named_modules()}
    missing = [m for m in modules if m not in names]
    if missing:
        raise IntraFusionError(f"ignored layer {type(missing[0]).__name__} is not a module of the model")
    return [names[m] for m in modules]


def variant_pruner(base: Pruner, method: Method, scorer: Scorer, fusion: FusionSettings, batches):
    """prune(variant, plan): `method` applied to `variant` (a copy of `base`) at the {group:
    sparsity} plan, with its repair or reconstruction on the calibration `batches` (the unpruned
    network's statistics and activations measured once for all variants, at the first variant:
    never where workers measure the profile): what the sensitivity profile measures, here or in a
    worker process (experiments/compress.py)."""
    inputs = RepairInputs(base.model, batches) if method.needs_data else None

    @functools.cache
    def statistics():
        return reference_statistics(base.model, batches)

    def prune(variant: Pruner, plan: dict[int, float]) -> None:
        prune_plan(variant, plan, method, scorer, fusion)
        if method.repair:
            repair_pruned(base, variant, inputs, statistics())
        if method.reconstruct:
            reconstruct_pruned(base, variant, inputs)
    return prune


def folded_base(model: nn.Module, example_inputs: torch.Tensor, ignored=()) -> Pruner:
    """The Pruner `compress` prunes copies of: `model` folded in place, with its architecture's
    pruner options and the layers named in `ignored` keeping their widths."""
    options = pruner_options(model)
    fixed = [*options.pop("fixed_layers", ()), *ignored]
    return Pruner(model, example_inputs, fixed_layers=fixed, **options)


def budget_plan(base: Pruner, example_inputs: torch.Tensor, groups, budget: tuple[str, float],
                allocation: str, method: Method, criterion, scorer: Scorer, fusion: FusionSettings,
                batches, round_to=None, held_out=None, iterative=False, profile_cache=None,
                reference: tuple[int, int] | None = None, profile_pool=None) -> dict[int, float]:
    """{group index: sparsity} meeting `budget` (kind, value) with `allocation` (see
    allocation.allocate); a sparsity with `uniform` is that sparsity in every group. Sensitivity
    profiles are cached in `profile_cache` (a JSON file) under the digests of the folded network
    and the calibration data, the method, criterion (a name) and fusion settings. reference: the
    unpruned (MACs, params) the budget is a fraction of (allocation.calibrate). profile_pool: see
    `compress`."""
    kind, value = budget
    if kind == "sparsity" and allocation == "uniform" and not round_to:
        return sparsity_plan(base, groups, value)
    prune = variant_pruner(base, method, scorer, fusion, batches)
    settings = None
    if profile_cache is not None and allocation == "sensitivity" and isinstance(criterion, str):
        settings = dict(model=tensor_digest(*base.model.state_dict().values()), method=method.name,
                        criterion=criterion, fusion=dataclasses.asdict(method.fusion(fusion)),
                        calibration=tensor_digest(*[x for x, _ in batches]) if batches else None)
    indices = range(len(base.groups)) if groups is None else list(groups)
    return allocate(base, example_inputs, indices, kind, value, allocation, scorer=scorer, prune=prune,
                    held_out=held_out, iterative=iterative, round_to=round_to, cache=profile_cache,
                    cache_settings=settings, reference=reference, profile_pool=profile_pool).plan


def compress(model: nn.Module, example_inputs: torch.Tensor, *, sparsity: float | None = None,
             macs: float | None = None, params: float | None = None, groups=None,
             method: str | None = None, criterion="l1", calibration=None, ignored_layers=(),
             allocation: str = "uniform", round_to: int | None = None, held_out=None,
             iterative: bool = False, profile_cache=None, profile_pool=None, **fusion_options) -> nn.Module:
    """A pruned copy of `model` (left untouched) with a `sparsity` fraction of the channels of
    each prunable group removed (and, for Intra-Fusion, fused into the kept ones).

    example_inputs: a batch the model accepts (e.g. (1, 3, 32, 32)), to trace it. groups: paper
    indices (0 = last prunable group), None = every group. method: a name of methods.METHOD_NAMES;
    None: methods.default_method, the best measured with or without calibration data.
    criterion: a name of importance.CRITERIA or a torch_pruning Importance. calibration: an
    iterable of input tensors or (input, target) pairs (repair and reconstruct methods, taylor,
    chip).
    ignored_layers: modules whose out-channels keep their width (the classifier always does).
    fusion_options: FusionSettings fields. The result is in eval mode; see restore_batchnorms.

    Instead of `sparsity`, a budget: macs= / params= the fraction of the unpruned MACs or
    parameters to keep (torch-pruning's op counter; met within 1%, never exceeded), shared among
    the groups by `allocation` (allocation.ALLOCATIONS: uniform, global, sensitivity; with
    `sparsity`, global prunes that fraction of all channels ranked together). sensitivity needs
    held_out=(images, labels), labeled images not in `calibration` and never the test set;
    iterative=True re-measures after each step; profile_cache: a JSON file reusing profiles across
    budgets (and keeping the groups an interrupted profile measured); profile_pool: an open
    experiments.parallel pool whose workers measure the profile's rungs, each holding this very
    model, method and data (experiments/compress.py makes one). round_to: keep every pruned
    group's width a multiple of it, as torch-pruning does.

    A transformers causal LM (*ForCausalLM) is passed as it is, with token ids (B, L) as
    example_inputs and calibration batches (tensors or dicts with input_ids), and comes back the
    same class, smaller (decoder.py: MLP neurons and whole heads / KV groups; budgets are fractions
    of the decoder blocks' MACs or parameters; uniform, global or sensitivity allocation, the last
    with held_out= token windows (N, L) from text never used for calibration nor testing)."""
    budget = one_budget(sparsity=sparsity, macs=macs, params=params)
    spec = get_method(method or default_method(calibration is not None))
    fusion = fusion_settings(fusion_options)
    if route(model):
        return compress_lm(model, example_inputs, budget, spec, criterion, calibration, groups, allocation,
                           round_to, ignored_layers, fusion, held_out=held_out)
    batches = calibration_pairs(calibration)
    if spec.needs_data and not batches:
        raise IntraFusionError(f"method {spec.name!r} needs calibration data: pass calibration=")
    scorer = make_scorer(criterion, batches)
    ignored = _layer_names(model, ignored_layers)
    model = copy.deepcopy(model).eval()
    reference = count_macs_params(model, example_inputs) if budget[0] != "sparsity" else None
    unpruned = batchnorm_statistics(model)
    base = folded_base(model, example_inputs, ignored)
    plan = budget_plan(base, example_inputs, groups, budget, allocation, spec, criterion, scorer, fusion,
                       batches, round_to, held_out, iterative, profile_cache, reference, profile_pool)
    pruner = base.copy() if spec.needs_data else base
    prune_plan(pruner, plan, spec, scorer, fusion)
    if spec.repair:
        repair_pruned(base, pruner, batches)
    if spec.reconstruct:
        reconstruct_pruned(base, pruner, batches)
    restore_batchnorms(pruner, unpruned, batches)
    return pruner.model


def fold_batchnorms(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Fold every BN that follows a conv/linear into it, in place (call before building a
    torch-pruning pruner whose groups `fuse_group` fuses); the number folded. The BNs stay as
    identities in eval mode, so keep them in eval mode while fine-tuning, or re-estimate them."""
    graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example_inputs)
    return fold_all_batchnorms(graph)


def fuse_group(group, importance=None, **fusion_options) -> bool:
    """Fuse the channels a torch-pruning `group` is about to prune into the ones it keeps, in
    place, before `group.prune()`; False (nothing changed) when the group holds a layer that
    cannot be fused (grouped/depthwise convolution) or has nothing to prune.

    The group holds the pruned indices of its root; the full group (every channel, for features
    and scores) is rebuilt from its dependency graph, and the kept channels are the complement.
    importance: a criterion name without data (default l1) or a torch-pruning Importance; it
    only matters for the `importance` marginals. fusion_options: FusionSettings fields. Fold BN
    first (fold_batchnorms)."""
    fusion = fusion_settings(fusion_options)
    scorer = make_scorer("l1" if importance is None else importance, [])
    graph, root = group._DG, group[0].dep.target.module
    handler = group[0].dep.handler
    out = graph.is_out_channel_pruning_fn(handler)
    n = graph.get_out_channels(root) if out else graph.get_in_channels(root)
    pruned = torch.as_tensor(sorted(set(group[0].idxs)), dtype=torch.long)  # root: plain = root indices
    kept = torch.ones(n, dtype=torch.bool)
    kept[pruned] = False
    if not len(pruned) or not kept.any():
        return False
    full = graph.get_pruning_group(root, handler, list(range(n)))
    slots, unfusable = group_slots(graph, full, n)
    if unfusable or not slots:
        return False
    scores = scorer(graph.model, graph, full, n, pristine=False)
    fuse_channels(slots, kept.nonzero().flatten(), scores.cpu(), fusion)
    return True
