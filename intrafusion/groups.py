"""Numbered dependency groups and a pruner that removes or fuses their channels.

Groups are numbered like the paper: walk the conv/linear layers in reverse definition order,
skip the final classifier (and any other layer of fixed width), and give each new group
(identified by the set of layers whose out-channels it prunes) the next number; group 0 is the
last prunable group.

Layers that Intra-Fusion cannot fuse are reported once per Pruner and its copies (one warning per
layer type and reason): a group with a grouped/depthwise convolution is pruned the default way; a
group with LayerNorm (or another per-channel layer that is not a folded BN) is fused in its
conv/linear layers while that layer's parameters are pruned by index.
"""
from __future__ import annotations

import copy
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from .attention import head_dims, sync_widths, unit_channels, unit_scores
from .folding import fold_all_batchnorms
from .fusion import (FUSABLE_LAYERS, FUSION_RULES, channel_features, fuse_slots, fusion_maps,
                     group_slots, index_pruned_layers)
from .importance import Scorer
from .transport import MARGINALS, TARGETS, channel_distances, transport_map
from .errors import IntraFusionError

PRUNING = ("default", "intra_fusion")  # discard the pruned channels, or fuse them first


@dataclass(frozen=True)
class GroupInfo:
    """A prunable group: its number, the layers whose out-channels it prunes, and the layer
    used as root to fetch it from the dependency graph."""

    index: int
    layers: tuple[str, ...]
    root: str


@dataclass(frozen=True)
class FusionSettings:
    """How a group is fused: OT targets and marginals, cost norm p, fusion rule, mixture seed;
    IntraFusionError for a value that is not one of the choices."""

    target: str = "most_important"
    source_prob: str = "uniform"
    target_prob: str = "uniform"
    p: float = 1.0
    rule: str = "fork"
    seed: int = 0

    def __post_init__(self):
        for value, choices, what in [(self.target, TARGETS, "target"),
                                     (self.source_prob, MARGINALS, "source marginal"),
                                     (self.target_prob, MARGINALS, "target marginal"),
                                     (self.rule, FUSION_RULES, "fusion rule")]:
            if value not in choices:
                raise IntraFusionError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
        if not self.p > 0:
            raise IntraFusionError(f"p must be positive, got {self.p}")


def fuse_channels(slots, keep: torch.Tensor, scores: torch.Tensor, fusion: FusionSettings,
                  distances: dict | None = None) -> None:
    """Fuse all n channels of a group's `slots` (fusion.group_slots) into the kept ones, in place:
    channel features -> transport map T (k, n) -> fusion maps of `fusion.rule` -> rows and columns
    written at the kept positions. keep: (k,) kept indices; scores: (n,) importance (marginals).
    distances: a dict for this group's unpruned features, in which the (n, n) distances of
    cost norm p are kept for the next fusion of the same features (transport.channel_distances)."""
    n = len(scores)
    target = fusion.target if len(keep) < n else "most_important"  # nothing to cluster
    features = channel_features(slots)
    full = None
    if distances is not None and target == "most_important":
        full = distances.get(fusion.p)
        if full is None:
            full = distances[fusion.p] = channel_distances(features, fusion.p)
    T = transport_map(features, keep, scores, target, fusion.source_prob, fusion.target_prob,
                      fusion.p, fusion.seed, full)
    a_out, a_in = fusion_maps(T, fusion.rule, features)
    fuse_slots(slots, keep, a_out, a_in)


@dataclass
class PruneRecord:
    group: int
    channels: int
    kept: int
    fused: bool
    unfusable: list = field(default_factory=list)
    index_pruned: list = field(default_factory=list)


def kept_count(n: int, sparsity: float) -> int:
    """Channels kept out of n at `sparsity`: int(n·(1−sparsity)); the rest, lowest first, go."""
    return int(n * (1 - sparsity))


def check_sparsity(sparsity: float) -> None:
    """IntraFusionError unless 0 <= sparsity < 1 (NaN included)."""
    if not 0 <= sparsity < 1:
        raise IntraFusionError(f"sparsity {sparsity} outside [0, 1): pass values like 0.3 0.5")


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def find_classifier(model: nn.Module, num_classes: int | None = None) -> nn.Module:
    """The last Linear whose out_features is `num_classes` (default: that of the last Linear)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise IntraFusionError("model has no Linear classifier")
    num_classes = linears[-1].out_features if num_classes is None else num_classes
    matching = [m for m in linears if m.out_features == num_classes]
    if not matching:
        raise IntraFusionError(f"no Linear layer with {num_classes} outputs")
    return matching[-1]


GROUPING_SECONDS = 120.0  # numbering takes seconds; a graph still walking after this never ends


class _Expired(Exception):
    """Raised by the SIGALRM handler of `deadline`."""


@contextmanager
def deadline(seconds: float, message: str):
    """Raise IntraFusionError(message) when the block runs longer than `seconds` of wall time
    (a SIGALRM timer, checked between Python bytecodes). Unbounded where no timer can be set: not
    the main thread, no SIGALRM (Windows), or a timer already pending (it is left to fire)."""
    if (not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def expire(_signum, _frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise IntraFusionError(message) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def number_groups(model: nn.Module, graph, classifier: nn.Module, fixed=()) -> list[GroupInfo]:
    """The model's prunable groups in paper order (see module docstring); groups that would
    prune the out-channels of the classifier or of a `fixed` module are left out. IntraFusionError
    after GROUPING_SECONDS: torch-pruning's graph walk never ends on some structures (a rotary
    embedding's rotate-half: decoder.py explains why)."""
    message = (f"torch-pruning's dependency graph did not return the groups of {type(model).__name__} "
               f"within {GROUPING_SECONDS:.0f} s (it never does on some structures, e.g. a rotary "
               "embedding's rotate-half; see intrafusion/decoder.py)")
    with deadline(GROUPING_SECONDS, message):
        return _number_groups(model, graph, classifier, fixed)


def _number_groups(model: nn.Module, graph, classifier: nn.Module, fixed=()) -> list[GroupInfo]:
    names = {m: n for n, m in model.named_modules()}
    groups, seen = [], set()
    layers = [m for m in model.modules() if isinstance(m, FUSABLE_LAYERS) and m is not classifier]
    for module in reversed(layers):
        fn = graph.get_pruner_of_module(module).prune_out_channels
        group = graph.get_pruning_group(module, fn, list(range(_out_channels(module))))
        outs = {item.dep.target.module for item in group
                if graph.is_out_channel_pruning_fn(item.dep.handler)}
        if classifier in outs or any(m in outs for m in fixed):
            continue
        key = tuple(sorted(names[m] for m in outs if isinstance(m, FUSABLE_LAYERS)))
        if key in seen:
            continue
        seen.add(key)
        groups.append(GroupInfo(len(groups), key, names[module]))
    return groups


def _unfusable_reason(module: nn.Module | None) -> str:
    if isinstance(module, nn.modules.conv._ConvNd) and (module.groups != 1 or module.transposed):
        return "grouped, depthwise or transposed convolution"
    return "irregular channel map"


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of `model` for `example_input` (e.g. one image, (1, 3, H, W)), counted by
    torch-pruning's op counter (multiply-accumulates of conv/linear, plus its element-wise ops)."""
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


class Pruner:
    """A folded copy of a network with its dependency graph and numbered groups.

    The model passed in is modified in place (BN folded); `copy()` gives an independent pruner
    whose model can be pruned without retracing the graph. `fixed_layers` names layers whose
    out-channels must keep their width (like the classifier); `customized_pruners` maps module
    types to torch-pruning pruners (see models.pruner_options).

    channel_map[name] holds, for every conv/linear layer, the original index of each of its
    current out-channels (used by repair to compare with the unpruned network)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, num_classes: int | None = None,
                 fixed_layers=(), customized_pruners=None):
        self.model = model.eval()
        self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                            customized_pruners=customized_pruners)
        self.folded = fold_all_batchnorms(self.graph)
        self.classifier = find_classifier(model, num_classes)
        self._modules = dict(model.named_modules())
        fixed = [self._modules[name] for name in fixed_layers]
        self.groups = number_groups(model, self.graph, self.classifier, fixed)
        self.head_dims = head_dims(model)  # q/k/v layers of attention modules -> head size
        self.pristine = True
        self.channel_map = {name: torch.arange(_out_channels(m)) for name, m in self._modules.items()
                            if isinstance(m, FUSABLE_LAYERS)}
        self.notices: set = set()  # (layer type, reason) already warned about; shared by copies
        self.distances: dict | None = None  # see keeping_distances; shared by copies

    def copy(self) -> "Pruner":
        """An independent deep copy (model and graph) for pruning one variant."""
        # Shared, never copied: autograd nodes from tracing and the `ops` module (not copyable),
        # and torch-pruning's pruner objects (it compares their bound methods by identity).
        memo = {id(self.graph.ops): self.graph.ops, id(self.notices): self.notices,
                id(self.distances): self.distances}
        for pruner in [*tp.pruner.function.PrunerBox.values(),
                       *self.graph.REGISTERED_PRUNERS.values(),
                       *self.graph.CUSTOMIZED_PRUNERS.values()]:
            memo[id(pruner)] = pruner
        for node in self.graph.module2node.values():
            memo[id(node.grad_fn)] = node.grad_fn
        # deepcopy recurses along the chain of graph nodes (a few frames per node): ResNet50's
        # 175 nodes exceed Python's default limit of 1000
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + 20 * len(self.graph.module2node))
        try:
            return copy.deepcopy(self, memo)
        finally:
            sys.setrecursionlimit(limit)

    @contextmanager
    def keeping_distances(self):
        """Within the block, the pristine copies of this pruner keep each group's channel
        distances (fuse_channels) for the next copy that fuses the group, at another sparsity:
        one measurement per group instead of one per fusion (for grids and sensitivity
        profiles; a single fusion would measure (n, n) instead of (n, k) for nothing)."""
        kept = self.distances
        self.distances = {} if kept is None else kept
        try:
            yield self
        finally:
            self.distances = kept

    def _notice(self, name: str, reason: str) -> None:
        """Warn once per (layer type, reason) across this pruner and its copies."""
        kind = type(self._modules[name]).__name__ if name in self._modules else name
        if (kind, reason) not in self.notices:
            self.notices.add((kind, reason))
            warnings.warn(f"intra_fusion: {kind} layers ({name}, …) {reason}", stacklevel=3)

    def _track_channels(self, pruning_group) -> None:
        """Update channel_map for the conv/linear out-channels removed by `pruning_group`."""
        for item in pruning_group:
            module = item.dep.target.module
            if isinstance(module, FUSABLE_LAYERS) and self.graph.is_out_channel_pruning_fn(item.dep.handler):
                name = self.graph._module2name[module]
                kept = torch.ones(len(self.channel_map[name]), dtype=torch.bool)
                kept[list(item.idxs)] = False
                self.channel_map[name] = self.channel_map[name][kept]

    def check_group(self, index: int) -> GroupInfo:
        """The group numbered `index`; IntraFusionError when there is none."""
        if not isinstance(index, int) or not 0 <= index < len(self.groups):
            raise IntraFusionError(f"group index {index} out of range: the model has {len(self.groups)} "
                                   f"groups (0..{len(self.groups) - 1})")
        return self.groups[index]

    def unit(self, index: int) -> int:
        """Channels pruned together in group `index`: the head size for the q/k/v group of an
        attention module (whole heads go, see attention.py), else 1."""
        return max([self.head_dims.get(name, 1) for name in self.check_group(index).layers])

    def check_prunable(self, index: int, sparsity: float) -> tuple[int, int]:
        """(n, k): the group's current width and the channels `sparsity` keeps of it (whole
        units: kept_count of the heads for an attention group); IntraFusionError for a sparsity
        outside [0, 1) or one that would leave the group without a channel (head)."""
        check_sparsity(sparsity)
        n, unit = _out_channels(self._modules[self.check_group(index).root]), self.unit(index)
        k = kept_count(n // unit, sparsity) * unit
        if k < 1:
            what = "channel" if unit == 1 else "head"
            raise IntraFusionError(f"sparsity {sparsity} would leave group {index} ({n // unit} "
                                   f"{what}s) with no {what}")
        return n, k

    def full_group(self, index: int):
        """The torch-pruning group of group `index` with all its current channels, and n."""
        root = self._modules[self.check_group(index).root]
        n = _out_channels(root)
        fn = self.graph.get_pruner_of_module(root).prune_out_channels
        return self.graph.get_pruning_group(root, fn, list(range(n))), n

    def changed_modules(self, index: int) -> set[str]:
        """Names of the modules whose parameters pruning group `index` changes."""
        names = self.graph._module2name
        group, _ = self.full_group(index)
        return {names[item.dep.target.module] for item in group if item.dep.target.module in names}

    def prune_group(self, index: int, sparsity: float, method: str, scorer: Scorer,
                    fusion: FusionSettings = FusionSettings()) -> PruneRecord:
        """Prune group `index` at `sparsity` with `method` (default or intra_fusion), in place.
        The fusion rule `varfix` gets the channel features the transport map was computed from."""
        if method not in PRUNING:
            raise IntraFusionError(f"unknown pruning {method!r}; choose one of {', '.join(PRUNING)}")
        n, k = self.check_prunable(index, sparsity)
        group, _ = self.full_group(index)
        scores = scorer(self.model, self.graph, group, n, pristine=self.pristine)
        unit = self.unit(index)
        order = torch.argsort(unit_scores(scores.cpu(), unit), stable=True)
        pruned = unit_channels(order[: (n - k) // unit], unit)
        keep = unit_channels(order[(n - k) // unit:], unit)
        record = PruneRecord(index, n, k, fused=False)
        if method == "intra_fusion" and unit > 1:
            self._notice(self.groups[index].root, "are attention heads: they are pruned whole, the "
                         "default way (averaging heads does not average softmax(q·kᵀ)·v; see "
                         "intrafusion/attention.py)")
        elif method == "intra_fusion":
            slots, unfusable = group_slots(self.graph, group, n)
            record.unfusable = unfusable
            for name in unfusable:
                self._notice(name, f"cannot be fused ({_unfusable_reason(self._modules.get(name))}): "
                                   "groups containing them are pruned the default way")
            if not unfusable and slots:
                record.index_pruned = index_pruned_layers(self.graph, group)
                for name in record.index_pruned:
                    self._notice(name, "are not fused: their per-channel parameters are pruned by "
                                       "index while the group's conv/linear layers are fused")
                shared = self.distances is not None and self.pristine
                fuse_channels(slots, keep, scores.cpu(), fusion,
                              self.distances.setdefault(index, {}) if shared else None)
                record.fused = True
        if len(pruned):
            root = self._modules[self.groups[index].root]
            fn = self.graph.get_pruner_of_module(root).prune_out_channels
            pruning_group = self.graph.get_pruning_group(root, fn, pruned.tolist())
            self._track_channels(pruning_group)
            pruning_group.prune()
            sync_widths(self.model)
            self.pristine = False
        return record

    def prune(self, group_indices, sparsity: float, method: str, scorer: Scorer,
              fusion: FusionSettings = FusionSettings()) -> list[PruneRecord]:
        """Prune several groups one after the other in the given order, re-scoring each."""
        return [self.prune_group(i, sparsity, method, scorer, fusion) for i in group_indices]
