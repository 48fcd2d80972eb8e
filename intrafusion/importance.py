"""Channel importance of a dependency group, measured on the folded network.

Magnitude, LAMP and Taylor scores come from torch-pruning's importance classes restricted to
conv/linear layers; l_inf, random and CHIP (channel independence, Sui et al. 2021) are computed
here. Criteria that need data (taylor, chip) measure the network in eval mode, without changing
it, and cache what they measured on the unpruned network so that every group and sparsity of a
grid reuses it.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from .evaluation import run_hooked
from .fusion import FUSABLE_LAYERS, group_slots
from .errors import IntraFusionError

CRITERIA = ("l1", "l2", "l_inf", "taylor", "lamp", "random", "chip")
DATA_CRITERIA = ("taylor", "chip")


def taylor_gradients(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Mean gradient of the cross-entropy loss per parameter name, over `batches` of (x, y),
    with the model in eval mode; the model's parameters and .grad are left untouched."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    total = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                t.add_(g)
    model.train(was_training)
    return {n: t / max(len(batches), 1) for n, t in zip(names, total)}


def feature_matrices(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """(N, C, L): each sample's output as a channels × positions matrix. Conv: positions are
    the H×W pixels; Linear: the out-features are the channels (the last dim), positions the rest
    (tokens; L = 1 for a plain (N, C) output)."""
    if isinstance(module, nn.Linear):
        out = out.movedim(-1, 1)
    return out.reshape(out.shape[0], out.shape[1], -1).float()


def channel_independence(a: torch.Tensor) -> torch.Tensor:
    """CHIP's channel independence (N, C) of feature matrices a (N, C, L): how much the nuclear
    norm ‖a_n‖_* drops when channel c's row is zeroed. A channel the others can reproduce
    (linearly dependent on them) loses little; an independent one loses much. C SVDs per sample."""
    full = torch.linalg.svdvals(a).sum(-1)
    ci = torch.empty(a.shape[:2], dtype=a.dtype, device=a.device)
    for c in range(a.shape[1]):
        masked = a.clone()
        masked[:, c] = 0
        ci[:, c] = full - torch.linalg.svdvals(masked).sum(-1)
    return ci


@torch.no_grad()
def chip_scores(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Mean channel independence (C,) of every conv/linear layer's output channels, by layer
    name, over the images of `batches`; measured once on the unpruned network (it costs one
    SVD per channel and image)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, _inputs, out):
            sums[name] = sums.get(name, 0) + channel_independence(feature_matrices(module, out)).sum(0)
        return record

    names = [n for n, m in model.named_modules() if isinstance(m, FUSABLE_LAYERS)]
    images = [x for x, _ in batches]
    run_hooked(model, names, hook, images)
    count = max(sum(len(x) for x in images), 1)
    return {n: s / count for n, s in sums.items()}


def _linf(graph, group, n: int) -> torch.Tensor:
    """Mean over the group's conv/linear rows and columns of each channel's max |weight|."""
    slots, _ = group_slots(graph, group, n)
    per_slot = []
    for s in slots:
        w = s.module.weight.detach().abs()
        vals = w[s.index] if s.out else w[:, s.index].movedim(1, 0)
        per_slot.append(vals.flatten(1).amax(1).float())
    return torch.stack(per_slot).mean(0)


class Scorer:
    """Scores the n channels of a group with one criterion: a name of CRITERIA, or any
    torch-pruning Importance object (called on the full group as it is).

    `batches` (a list of (x, y)) is needed by taylor and chip. Measurements on the pristine
    (unpruned, folded) network are cached unless `cache=False`; pass `pristine=False` when the
    network was pruned since, and they are measured again."""

    def __init__(self, criterion, batches=None, seed: int = 0, cache: bool = True):
        self.importance = criterion if isinstance(criterion, tp.importance.Importance) else None
        if self.importance is None and criterion not in CRITERIA:
            raise IntraFusionError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        if criterion in DATA_CRITERIA and not batches:
            raise IntraFusionError(f"criterion {criterion!r} needs calibration batches")
        self.criterion = criterion
        self.batches = batches
        self.cache = cache
        self.generator = torch.Generator().manual_seed(seed)
        self._pristine_cache = None
        self._magnitude = {
            "l1": tp.importance.MagnitudeImportance(p=1, normalizer=None, target_types=FUSABLE_LAYERS),
            "l2": tp.importance.MagnitudeImportance(p=2, normalizer=None, target_types=FUSABLE_LAYERS),
            "lamp": tp.importance.LAMPImportance(p=2),
        }

    def _measure(self, model: nn.Module, pristine: bool) -> dict[str, torch.Tensor]:
        if pristine and self._pristine_cache is not None:
            return self._pristine_cache
        measure = taylor_gradients if self.criterion == "taylor" else chip_scores
        result = measure(model, self.batches)
        if pristine and self.cache:
            self._pristine_cache = result
        return result

    def __call__(self, model: nn.Module, graph, group, n: int, pristine: bool = True) -> torch.Tensor:
        """Scores (n,) of a full group; higher means more important."""
        if self.importance is not None:
            scores = self.importance(group)
            if scores is None or scores.shape != (n,):
                raise IntraFusionError(f"{type(self.importance).__name__} gave no score per channel "
                                       f"for a group of {n} channels")
            return scores.float()
        if self.criterion in self._magnitude:
            return self._magnitude[self.criterion](group).float()
        if self.criterion == "l_inf":
            return _linf(graph, group, n)
        if self.criterion == "random":
            return torch.rand(n, generator=self.generator)
        measured = self._measure(model, pristine)
        if self.criterion == "taylor":
            params = dict(model.named_parameters())
            for name, grad in measured.items():
                params[name].grad = grad
            try:
                scores = tp.importance.GroupTaylorImportance(normalizer=None, target_types=FUSABLE_LAYERS)(group)
            finally:
                for name in measured:
                    params[name].grad = None
            return scores.float()
        slots, _ = group_slots(graph, group, n)
        rows = [measured[s.name][s.index].flatten(1).mean(1) for s in slots if s.out]
        return torch.stack(rows).mean(0).float()
