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

from .errors import IntraFusionError

FUSION_RULES = ("fork", "mean", "varfix")
FUSABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)  # the one list of layers folded, scored and fused


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
            continue  # pruned by index, not fused: folded BNs, and see index_pruned_layers
        index = _index_matrix(item.idxs, item.root_idxs, n)
        grouped = isinstance(module, nn.modules.conv._ConvNd) and (module.groups != 1 or module.transposed)
        if index is None or grouped:
            unfusable.append(name)
            continue
        slots.append(Slot(name, module, graph.is_out_channel_pruning_fn(item.dep.handler), index))
    return slots, unfusable


def is_identity_batchnorm(module: nn.Module) -> bool:
    """Whether `module` is a BN whose statistics and affine map were folded away (it computes
    the identity, see folding.py), so pruning it by index loses nothing."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.running_mean is None:
        return False
    identity = [(module.running_mean, 0.0), (module.running_var, 1.0 - module.eps)]
    if module.affine:
        identity += [(module.weight, 1.0), (module.bias, 0.0)]
    return all(torch.allclose(t.detach(), torch.full_like(t, v), rtol=0, atol=1e-6) for t, v in identity)


def index_pruned_layers(graph, group) -> list[str]:
    """Names of the group's layers with per-channel parameters that fusion leaves alone:
    neither conv/linear nor folded-away BN (LayerNorm, a BN that could not be folded, PReLU, …).
    Their pruned positions are simply removed, while the group's conv/linear layers are fused."""
    names = []
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or isinstance(module, FUSABLE_LAYERS):
            continue
        stateful = (any(p.numel() for p in module.parameters(recurse=False))
                    or isinstance(module, nn.modules.batchnorm._BatchNorm))
        if not stateful or is_identity_batchnorm(module):
            continue
        name = graph._module2name.get(module, type(module).__name__)
        if name not in names:
            names.append(name)
    return names


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


def shrinkage(a: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """v (k,): variance factor of each fused channel, v_j = Σ_ii' a_ji a_ji' ρ_ii' = (a R aᵀ)_jj.

    a: (k, n) averaging weights (rows summing to one); features: (n, d) channel feature vectors;
    R = cosine-similarity Gram matrix of the feature rows (positive semidefinite, so v ≥ 0)."""
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    R = unit @ unit.T
    return torch.einsum("jn,nm,jm->j", a, R, a)


def fusion_maps(T: torch.Tensor, rule: str, features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_out, A_in), both (k, n), for transport map T (k, n) whose columns sum to one.

    fork: T on both sides, as the authors do. mean: rows of A_out sum to one, so a fused channel
    is a weighted average of the channels mapped to it, and A_in = T adds their contributions —
    exact when the channels mapped together are identical.

    varfix (needs `features`, (n, d)): the mean rule with each fused row rescaled to undo the
    variance lost by averaging. Let a = T normalized per row and z_i the output of channel i
    (weights and bias of the layer, BN folded in). The fused channel is z'_j = Σ_i a_ji z_i. If
    the channels have about equal variance σ² and correlations ρ_ii',
        Var z'_j = Σ_ii' a_ji a_ji' Cov(z_i, z_i') = σ² Σ_ii' a_ji a_ji' ρ_ii' = σ² v_j,
    so v_j ≤ 1 (equality only when the averaged channels are perfectly correlated) and the next
    layer sees a weaker signal. Without data, ρ_ii' is estimated by the cosine similarity of the
    channels' group feature vectors (the ones the OT cost compares): for white inputs x and
    z_i = w_i·x the correlation is exactly cos(w_i, w_i'). A_out = diag(1/√v) a restores
    variance σ² (v clamped at 1e-6); weights and bias are scaled alike, so the channel's mean grows
    by 1/√v too (without data the two cannot be separated). A_in = T, as in mean. At sparsity 0,
    T is the identity, v = 1 and nothing changes."""
    if rule == "fork":
        return T, T
    if rule not in ("mean", "varfix"):
        raise IntraFusionError(f"unknown fusion rule {rule!r}; choose one of {', '.join(FUSION_RULES)}")
    a = T / T.sum(dim=1, keepdim=True).clamp_min(1e-12)
    if rule == "mean":
        return a, T
    if features is None:
        raise IntraFusionError("the varfix rule needs the channel features")
    v = shrinkage(a, features.to(a)).clamp_min(1e-6)
    return a / v.sqrt()[:, None], T


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
