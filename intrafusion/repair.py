"""Statistics repair after pruning (REPAIR-style), for folded networks.

Pruning (and fusing) changes the distribution of every activation downstream. With BN folded into
the conv/linear layers, each such layer's output plays the role of a BN output, so repair
re-estimates every affected layer's per-channel mean μ and variance σ² on a few unlabeled batches
and rewrites the layer so that channel c again has the mean and variance that the unpruned
network had at the original channel channel_map[c]:

    out' = (out − μ) · s + μ_ref,   s = σ_ref / σ   (s = 1 where the channel is constant)
    W' = s · W (per out-channel),   b' = (b − μ) · s + μ_ref.

Layers are corrected in execution order within one forward pass: each layer's statistics depend
on the corrections of the layers before it, so every layer is measured only after those were
corrected (forward hooks that correct the layer and return the corrected output). Measuring all
layers first and correcting afterwards gives wrong corrections.
"""
from __future__ import annotations

import torch
from torch import nn

from .evaluation import first_changed_segment, model_segments, run_hooked, same_state
from .fusion import FUSABLE_LAYERS

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _channel_dim(module: nn.Module) -> int:
    """Channel axis of the module's output: last for Linear, 1 for convolutions."""
    return -1 if isinstance(module, nn.Linear) else 1


def _inputs(batches) -> list[torch.Tensor]:
    """The input tensors of `batches`, given as tensors or as (x, y) pairs."""
    return [b if torch.is_tensor(b) else b[0] for b in batches]


def channel_moments(out: torch.Tensor, dim: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean (C,), m2 (C,)) of `out` per channel along `dim`, over every other axis, in
    float64; m2 is the sum of squared deviations from the mean (two passes, one float32 temporary
    the size of `out`)."""
    dim = dim % out.dim()
    axes = [d for d in range(out.dim()) if d != dim]
    shape = [-1 if d == dim else 1 for d in range(out.dim())]
    out = out.detach()
    count = out.numel() // out.shape[dim]
    mean = out.sum(axes, dtype=torch.float64) / count
    rounded = mean.to(out.dtype)
    m2 = (out - rounded.view(shape)).square_().sum(axes, dtype=torch.float64)
    return count, mean, m2 - count * (mean - rounded.double()).square()


def merge_moments(a: tuple[int, torch.Tensor, torch.Tensor], b: tuple[int, torch.Tensor, torch.Tensor]
                  ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Moments of the union of two sets of values (Chan et al.'s pairwise update)."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta.square() * (na * nb / n)


def _mean_var(count: int, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mean, (m2 / count).clamp_min(0)


def constant_channels(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(C,) bool: channels whose spread is below 1e-6 of their magnitude, i.e. constant up to
    float32 rounding (a dead channel); their variance cannot be restored by scaling."""
    return var <= (1e-6 * mean.abs()).square() + 1e-30


def affine_correction(mean: torch.Tensor, var: torch.Tensor, ref_mean: torch.Tensor,
                      ref_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (C,), with out·scale + shift having mean ref_mean and variance ref_var
    when out has mean `mean` and variance `var`; constant channels keep scale 1."""
    constant = constant_channels(mean, var)
    scale = torch.where(constant, torch.ones_like(var), (ref_var / var.clamp_min(1e-30)).sqrt())
    return scale, ref_mean - mean * scale


@torch.no_grad()
def correct_layer(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make `module` (conv/linear) compute out·scale + shift per out-channel, in place; a bias
    is created if missing."""
    w = module.weight
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    w.mul_(scale.to(w).view(-1, *([1] * (w.dim() - 1))))
    module.bias.copy_(module.bias * scale.to(w) + shift.to(w))


@torch.no_grad()
def layer_statistics(model: nn.Module, layer_names, batches) -> Stats:
    """{name: (mean (C,), var (C,))} in float64 of each named conv/linear layer's output per
    channel, over the batch and spatial (or token) axes of all `batches`, model in eval mode."""
    moments: dict[str, tuple] = {}

    def hook(name):
        def record(module, _inputs, out):
            new = channel_moments(out, _channel_dim(module))
            moments[name] = merge_moments(moments[name], new) if name in moments else new
        return record

    run_hooked(model, layer_names, hook, _inputs(batches))
    return {n: _mean_var(*moments[n]) for n in layer_names}


@torch.no_grad()
def execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers in the order a forward pass of `example_input` runs them."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, name=name: order.append(name))
               for name, m in model.named_modules() if isinstance(m, FUSABLE_LAYERS)]
    was_training = model.training
    model.eval()
    try:
        model(example_input.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return list(dict.fromkeys(order))


def layers_to_repair(base_model: nn.Module, pruned_model: nn.Module, example_input: torch.Tensor,
                     exclude=()) -> list[str]:
    """The conv/linear layers of `pruned_model`, in execution order, from the first one whose
    parameters differ from `base_model` on (its outputs and all later ones changed), without the
    names in `exclude` (the classifier)."""
    order = execution_order(pruned_model, example_input)
    base = dict(base_model.named_modules())
    pruned = dict(pruned_model.named_modules())
    first = next((i for i, n in enumerate(order) if not same_state(base[n], pruned[n])), len(order))
    excluded = set(exclude)
    return [n for n in order[first:] if n not in excluded]


@torch.no_grad()
def repair(model: nn.Module, reference: Stats, channel_map: dict[str, torch.Tensor], layer_names,
           batches, forward=None) -> Stats:
    """Correct the named conv/linear layers of `model` in place, in one forward pass of all
    `batches` concatenated into one batch, so that each layer's output channel c has the mean and
    variance reference[name] had at channel channel_map[name][c].

    reference: layer_statistics of the unpruned (folded) network; channel_map: Pruner.channel_map.
    A layer is measured after every layer before it was corrected (the hook corrects the layer
    and passes the corrected output on); a layer run twice in one pass is corrected once.
    Returns each layer's (mean, var) as measured just before it was corrected.
    Concatenating keeps it to one pass; its activations for all calibration images (e.g. 10
    batches of 128) must fit in memory at once, one layer at a time. forward(x): what runs
    `model` on that batch (default model(x); RepairInputs.forward starts later)."""
    measured: Stats = {}

    def hook(name):
        def correct(module, _inputs, out):
            if name in measured:
                return None
            dim = _channel_dim(module)
            mean, var = measured[name] = _mean_var(*channel_moments(out, dim))
            index = channel_map[name].to(mean.device)
            ref_mean, ref_var = (t.to(mean.device)[index] for t in reference[name])
            scale, shift = affine_correction(mean, var, ref_mean, ref_var)
            correct_layer(module, scale, shift)
            shape = [1] * out.dim()
            shape[dim] = -1
            return out * scale.to(out).view(shape) + shift.to(out).view(shape)
        return correct

    run_hooked(model, layer_names, hook, [torch.cat(_inputs(batches))], forward)
    return measured


def reference_statistics(model: nn.Module, batches) -> Stats:
    """layer_statistics of every conv/linear layer that `model` runs (the unpruned network)."""
    return layer_statistics(model, execution_order(model, _inputs(batches)[0][:1]), batches)


class RepairInputs:
    """The calibration batches of the repairs of one network's variants, and the unpruned
    network's activations entering its segments (evaluation.model_segments), kept within
    `cache_mb`. A variant's layers before its first changed segment compute what the unpruned
    ones do, so its repair pass starts there: the same numbers as a whole forward pass, without
    re-running the unchanged layers for every variant of a grid or a sensitivity profile. A
    model without segments runs whole."""

    def __init__(self, base_model: nn.Module, batches, cache_mb: float = 1024):
        self.model, self.batches = base_model, list(batches)
        self.segments = model_segments(base_model)
        self.budget = cache_mb * 2 ** 20
        self.entering: dict[int, torch.Tensor] = {}

    def _bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.entering.values())

    @torch.no_grad()
    def activations(self, index: int) -> torch.Tensor:
        """The unpruned network's input to segment `index` for all calibration images (one
        batch), computed from the deepest kept one before it. Every input passed on the way is
        kept, the shallowest dropped first beyond the budget: feature maps shrink with depth, and
        the deeper a segment, the more variants start at or after it."""
        if index in self.entering:
            return self.entering[index]
        source = max((k for k in self.entering if k < index), default=0)
        x = self.entering[source] if source else torch.cat(_inputs(self.batches))
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        for k in range(source, index):
            x = self.segments[k][1](self.model, x.to(device))
            self.entering[k + 1] = x
            while self._bytes() > self.budget:
                del self.entering[min(self.entering)]
        self.model.train(was_training)
        return x

    def forward(self, variant: nn.Module):
        """forward(x) for `repair`: `variant` run from its first changed segment on the cached
        unpruned activations (x, the concatenated batches, is then not used)."""
        if self.segments is None:
            return None
        start = first_changed_segment(self.model, variant, self.segments)
        if start == 0:
            return None
        entering = self.activations(start)

        def run(_x: torch.Tensor) -> torch.Tensor:
            x = entering
            for _, fn in self.segments[start:]:
                x = fn(variant, x)
            return x
        return run


def repair_pruned(base, variant, batches, reference: Stats | None = None) -> list[str]:
    """Repair `variant` (a pruned copy of Pruner `base`) in place on `batches` ((x, y) pairs,
    input tensors, or RepairInputs of base's network, which skips the unchanged segments);
    return the names of the repaired layers (all but the classifier from the first changed one
    on). `reference`: reference_statistics(base.model, batches), computed here when not given;
    compute it once per model and pass it in a grid."""
    inputs = batches if isinstance(batches, RepairInputs) else RepairInputs(base.model, batches, cache_mb=0)
    names = {m: n for n, m in base.model.named_modules()}
    first = _inputs(inputs.batches)[0][:1]
    if reference is None:
        reference = reference_statistics(base.model, inputs.batches)
    layers = layers_to_repair(base.model, variant.model, first, exclude=[names[base.classifier]])
    repair(variant.model, reference, variant.channel_map, layers, inputs.batches, inputs.forward(variant.model))
    return layers
