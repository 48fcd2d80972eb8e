"""Fusing the channels of a dependency group with a transport map.

A group couples the out-channels of some conv/linear layers (their weight rows) with the
in-channels of the layers that consume them (their weight columns). With a map A (k, n) the
rows become `A_out @ rows` and the columns `columns @ A_inᵀ`; the fused channels are written
at the kept positions, and the pruning step then removes the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FUSION_RULES = ("fork", "mean")
FUSABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass
class Slot:
    """One conv/linear of a group: its out-channel rows (`out=True`) or in-channel columns.

    index: (n, m) positions in the layer of each of the group's n channels (m > 1 when one
    channel feeds several inputs, e.g. a flattened feature map)."""

    name: str
    module: nn.Module
    out: bool
    index: torch.Tensor


def _index_matrix(idxs, root_idxs, n: int) -> torch.Tensor | None:
    pairs = sorted(zip(root_idxs, idxs))
    if len(pairs) % n or sorted({r for r, _ in pairs}) != list(range(n)):
        return None
    index = torch.tensor([i for _, i in pairs]).view(n, -1)
    return index


def group_slots(graph, group, n: int) -> tuple[list[Slot], list[str]]:
    """Split a full group (all n channels) into fusable slots and the names of layers that
    cannot be fused (grouped/depthwise convolutions, transposed convs, odd index maps)."""
    slots, unfusable = [], []
    for item in group:
        module = item.dep.target.module
        name = graph._module2name.get(module, type(module).__name__)
        if not isinstance(module, nn.Module) or not any(p.numel() for p in module.parameters(recurse=False)):
            continue
        if not isinstance(module, FUSABLE_LAYERS):
            continue  # normalization layers are identities after folding: pruned, not fused
        index = _index_matrix(item.idxs, item.root_idxs, n)
        grouped = isinstance(module, nn.modules.conv._ConvNd) and (module.groups != 1 or module.transposed)
        if index is None or grouped:
            unfusable.append(name)
            continue
        slots.append(Slot(name, module, graph.is_out_channel_pruning_fn(item.dep.handler), index))
    return slots, unfusable


def channel_features(slots: list[Slot]) -> torch.Tensor:
    """(n, d): for every channel its out-rows and in-columns over all slots, concatenated."""
    parts = []
    for s in slots:
        w = s.module.weight.detach()
        if s.out:
            parts.append(w[s.index].flatten(1))
        else:
            parts.append(w[:, s.index].transpose(0, 1).flatten(1))
    return torch.cat([p.to(torch.float32) for p in parts], dim=1)


def fusion_maps(T: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_out, A_in), both (k, n), for transport map T (k, n) whose columns sum to one.

    fork: T on both sides, as the authors do. mean: rows of A_out sum to one, so a fused channel
    is a weighted average of the channels mapped to it, and A_in = T adds their contributions —
    exact when the channels mapped together are identical."""
    if rule == "fork":
        return T, T
    if rule == "mean":
        return T / T.sum(dim=1, keepdim=True).clamp_min(1e-12), T
    raise ValueError(f"unknown fusion rule {rule!r}; choose one of {', '.join(FUSION_RULES)}")


@torch.no_grad()
def fuse_slots(slots: list[Slot], keep: torch.Tensor, a_out: torch.Tensor, a_in: torch.Tensor) -> None:
    """Write the fused channels at the kept positions of every slot, in place.

    keep: (k,) kept channel indices; a_out, a_in: (k, n)."""
    for s in slots:
        w = s.module.weight
        if s.out:
            a = a_out.to(w)
            rows = w[s.index]                                    # (n, m, ...)
            w[s.index[keep]] = torch.tensordot(a, rows, dims=1)
            if s.module.bias is not None:
                b = s.module.bias
                b[s.index[keep]] = a.to(b) @ b[s.index]
        else:
            a = a_in.to(w)
            cols = w[:, s.index]                                 # (o, n, m, ...)
            fused = torch.tensordot(a, cols.movedim(1, 0), dims=1)  # (k, o, m, ...)
            w[:, s.index[keep]] = fused.movedim(0, 1)
