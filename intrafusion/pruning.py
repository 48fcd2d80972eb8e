"""Numbered dependency groups and a pruner that removes or fuses their channels.

Groups are numbered like the paper: walk the conv/linear layers in reverse definition order,
skip the final classifier, and give each new group (identified by the set of layers whose
out-channels it prunes) the next number; group 0 is the last prunable group.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from .folding import fold_all_batchnorms
from .fusion import FUSABLE_LAYERS, channel_features, fuse_slots, fusion_maps, group_slots
from .importance import Scorer
from .transport import transport_map

METHODS = ("default", "intra_fusion")


@dataclass(frozen=True)
class GroupInfo:
    """A prunable group: its number, the layers whose out-channels it prunes, and the layer
    used as root to fetch it from the dependency graph."""

    index: int
    layers: tuple[str, ...]
    root: str


@dataclass(frozen=True)
class FusionSettings:
    target: str = "most_important"
    source_prob: str = "uniform"
    target_prob: str = "uniform"
    p: float = 1.0
    rule: str = "fork"
    seed: int = 0


@dataclass
class PruneRecord:
    group: int
    channels: int
    kept: int
    fused: bool
    unfusable: list = field(default_factory=list)


def kept_count(n: int, sparsity: float) -> int:
    """Channels kept out of n at `sparsity`: int(n·(1−sparsity)); the rest, lowest first, go."""
    return int(n * (1 - sparsity))


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def find_classifier(model: nn.Module, num_classes: int | None = None) -> nn.Module:
    """The last Linear whose out_features is `num_classes` (default: that of the last Linear)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no Linear classifier")
    num_classes = linears[-1].out_features if num_classes is None else num_classes
    matching = [m for m in linears if m.out_features == num_classes]
    if not matching:
        raise ValueError(f"no Linear layer with {num_classes} outputs")
    return matching[-1]


def number_groups(model: nn.Module, graph, classifier: nn.Module) -> list[GroupInfo]:
    """The model's prunable groups in paper order (see module docstring)."""
    names = {m: n for n, m in model.named_modules()}
    groups, seen = [], set()
    layers = [m for m in model.modules() if isinstance(m, FUSABLE_LAYERS) and m is not classifier]
    for module in reversed(layers):
        fn = graph.get_pruner_of_module(module).prune_out_channels
        group = graph.get_pruning_group(module, fn, list(range(_out_channels(module))))
        outs = {item.dep.target.module for item in group
                if graph.is_out_channel_pruning_fn(item.dep.handler)}
        if classifier in outs:
            continue
        key = tuple(sorted(names[m] for m in outs if isinstance(m, FUSABLE_LAYERS)))
        if key in seen:
            continue
        seen.add(key)
        groups.append(GroupInfo(len(groups), key, names[module]))
    return groups


class Pruner:
    """A folded copy of a network with its dependency graph and numbered groups.

    The model passed in is modified in place (BN folded); `copy()` gives an independent pruner
    whose model can be pruned without retracing the graph."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, num_classes: int | None = None):
        self.model = model.eval()
        self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        self.folded = fold_all_batchnorms(self.graph)
        self.classifier = find_classifier(model, num_classes)
        self.groups = number_groups(model, self.graph, self.classifier)
        self.pristine = True
        self._modules = dict(model.named_modules())

    def copy(self) -> "Pruner":
        """An independent deep copy (model and graph) for pruning one variant."""
        # Shared, never copied: autograd nodes from tracing and the `ops` module (not copyable),
        # and torch-pruning's pruner objects (it compares their bound methods by identity).
        memo = {id(self.graph.ops): self.graph.ops}
        for pruner in [*tp.pruner.function.PrunerBox.values(),
                       *self.graph.REGISTERED_PRUNERS.values(),
                       *self.graph.CUSTOMIZED_PRUNERS.values()]:
            memo[id(pruner)] = pruner
        for node in self.graph.module2node.values():
            memo[id(node.grad_fn)] = node.grad_fn
        return copy.deepcopy(self, memo)

    def check_group(self, index: int) -> GroupInfo:
        if not 0 <= index < len(self.groups):
            raise IndexError(f"group index {index} out of range: the model has {len(self.groups)} "
                             f"groups (0..{len(self.groups) - 1})")
        return self.groups[index]

    def full_group(self, index: int):
        """The torch-pruning group of group `index` with all its current channels, and n."""
        root = self._modules[self.check_group(index).root]
        n = _out_channels(root)
        fn = self.graph.get_pruner_of_module(root).prune_out_channels
        return self.graph.get_pruning_group(root, fn, list(range(n))), n

    def prune_group(self, index: int, sparsity: float, method: str, scorer: Scorer,
                    fusion: FusionSettings = FusionSettings()) -> PruneRecord:
        """Prune group `index` at `sparsity` with `method` (default or intra_fusion), in place."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity {sparsity} outside [0, 1)")
        group, n = self.full_group(index)
        k = kept_count(n, sparsity)
        if k < 1:
            raise ValueError(f"sparsity {sparsity} would leave group {index} ({n} channels) "
                             "with no channel")
        scores = scorer(self.model, self.graph, group, n, pristine=self.pristine)
        order = torch.argsort(scores.cpu(), stable=True)
        pruned = torch.sort(order[: n - k]).values
        keep = torch.sort(order[n - k:]).values
        record = PruneRecord(index, n, k, fused=False)
        if method == "intra_fusion":
            slots, unfusable = group_slots(self.graph, group, n)
            record.unfusable = unfusable
            if not unfusable and slots:
                target = fusion.target if k < n else "most_important"  # nothing to cluster
                T = transport_map(channel_features(slots), keep, scores.cpu(), target,
                                  fusion.source_prob, fusion.target_prob, fusion.p, fusion.seed)
                a_out, a_in = fusion_maps(T, fusion.rule)
                fuse_slots(slots, keep, a_out, a_in)
                record.fused = True
        if len(pruned):
            root = self._modules[self.groups[index].root]
            fn = self.graph.get_pruner_of_module(root).prune_out_channels
            self.graph.get_pruning_group(root, fn, pruned.tolist()).prune()
            self.pristine = False
        return record

    def prune(self, group_indices, sparsity: float, method: str, scorer: Scorer,
              fusion: FusionSettings = FusionSettings()) -> list[PruneRecord]:
        """Prune several groups one after the other in the given order, re-scoring each."""
        return [self.prune_group(i, sparsity, method, scorer, fusion) for i in group_indices]
