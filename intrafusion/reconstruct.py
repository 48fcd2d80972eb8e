"""Least-squares reconstruction after pruning (the reconstruction step of He et al. 2017,
"Channel Pruning", and of ThiNet), for folded networks.

Pruning removes channels; every layer downstream then sees other inputs. Reconstruction refits
the conv/linear layers of the pruned network one after the other, in execution order, on a few
calibration images: each layer's kept output channels are fitted, by ridge regression on the
*pruned* network's input to the layer (its upstream already refit), to the *unpruned* network's
output at the same channels (Pruner.channel_map); the classifier is fitted to the unpruned logits.

- A convolution is linear in its input patches: the patch of every sampled output position is a
  row of features (the `unfold` of the input there), one ones column for the bias; a grouped or
  depthwise convolution is one fit per group (its out-channels read only their group's inputs).
  A Linear layer's rows are its input vectors (every token of a transformer's MLP).
- A layer that writes into a residual stream is fitted at the add (`Unit`): the sum of the layers
  writing into it plus the pruned network's own shortcut must match the unpruned sum, so a block
  also corrects the error its shortcut carries from earlier blocks; a projection shortcut conv
  is fitted jointly with the block's last conv. `residual_units` knows the adds of the library's
  ResNets, MobileNetV2, Mixer, ViT and BERT.
- The ridge pulls toward the pruned (or fused) weights, not toward zero: λ = RIDGE × the mean
  diagonal of the layer's Gram matrix XᵀX/rows, i.e. relative to the mean energy of a feature,
  so one ratio serves every layer whatever its activations' magnitude, and a layer whose inputs
  did not change is a fixed point (its weights are the least-squares solution and the prior at
  once). RIDGE = 1e-3 was chosen on held-out training images (bench/reconstruct.py --tune),
  never the test set: on VGG11-BN at 10% of the MACs it is the best of 1e-4 … 1e-1 (3e-2 loses
  1.6 pt, 1e-1 3.2 pt: the pruned weights are a poor prior there); at 25% larger ratios gain at
  most 0.1–0.4 pt. Per-layer choices (λ scaled by features/rows, or picked by 2-fold
  cross-validation over the calibration batches) did not do better.
- Memory: at most POSITIONS sampled output positions per layer (seeded, spread evenly over the
  batches), XᵀX and XᵀY summed in float64 batch by batch (each batch's product in float32), the
  solve in float64. Models with segments (evaluation.model_segments) are walked segment by
  segment on cached activations entering the current segment, of the unpruned and the pruned
  network, for all calibration images: a layer's fit re-runs only its own segment.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IntraFusionError
from .evaluation import first_changed_segment, model_segments
from .models.cifar import BasicBlock, Bottleneck
from .models.extra import InvertedResidual, MixerBlock
from .repair import RepairInputs, _inputs, execution_order, layers_to_repair

RIDGE = 1e-3
POSITIONS = 60_000


@dataclass(frozen=True)
class Unit:
    """Layers fitted together to one target: the sum of their outputs plus `through`, input
    `through[1]` of module `through[0]` (a residual add's identity shortcut); one layer and no
    `through` for a layer fitted to its own output."""

    layers: tuple[str, ...]
    through: tuple[str, int] | None = None


def _last_conv(module: nn.Module, prefix: str) -> str:
    return [f"{prefix}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Conv2d)][-1]


def residual_units(model: nn.Module) -> list[Unit]:
    """The residual adds of the library's models, each as the Unit of the layers writing into it:
    ResNet BasicBlock/Bottleneck (last conv, with the projection shortcut's conv or the block's
    input), MobileNetV2's residual blocks, the Mixer's channel MLP, ViT's attention and MLP
    outputs, BERT's output layers. Other adds (the Mixer's token MLP, which writes transposed, or
    a network of your own) leave their layers fitted to their own outputs."""
    units = []
    for name, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, (BasicBlock, Bottleneck)):
            last = f"{name}.conv2" if isinstance(m, BasicBlock) else f"{name}.conv3"
            units.append(Unit((last, f"{name}.shortcut.0")) if len(m.shortcut) else Unit((last,), (name, 0)))
        elif isinstance(m, InvertedResidual) and m.residual:
            units.append(Unit((_last_conv(m.block, f"{name}.block"),), (name, 0)))
        elif isinstance(m, MixerBlock):
            units.append(Unit((f"{name}.channel_mlp.2",), (f"{name}.norm2", 0)))
        elif kind == "ViTLayer":
            units += [Unit((f"{name}.attention.o_proj",), (name, 0)),
                      Unit((f"{name}.mlp.fc2",), (f"{name}.layernorm_after", 0))]
        elif kind in ("BertSelfOutput", "BertOutput"):
            units.append(Unit((f"{name}.dense",), (name, 1)))
    return units


def fit_units(order: list[str], layer_names, residual: list[Unit]) -> list[Unit]:
    """The units that refit `layer_names`, in the execution `order` of their last layer: each
    residual unit holding one of them (all its layers refit together), every other name alone."""
    wanted = set(layer_names)
    position = {n: i for i, n in enumerate(order)}
    units = [u for u in residual if wanted & set(u.layers) and all(n in position for n in u.layers)]
    joint = {n for u in units for n in u.layers}
    units += [Unit((n,)) for n in layer_names if n not in joint]
    return sorted(units, key=lambda u: max(position[n] for n in u.layers))


def sample_positions(total: int, count: int, seed: int) -> torch.Tensor:
    """(min(total, count),) sorted flat indices drawn without replacement from range(total)."""
    if count >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:count].sort().values


def position_grid(t: torch.Tensor, channels_first: bool) -> tuple[int, ...]:
    """The grid a layer's output positions live on: (N, *spatial) of a conv's (N, C, *spatial)
    output, the leading axes of a Linear's (..., C)."""
    return (t.shape[0], *t.shape[2:]) if channels_first else tuple(t.shape[:-1])


def rows_at(t: torch.Tensor, flat: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """(P, C) values of `t` at the flat positions `flat` of its grid (position_grid)."""
    if channels_first:
        return t.movedim(1, -1)[torch.unravel_index(flat.to(t.device), position_grid(t, True))]
    return t.reshape(-1, t.shape[-1])[flat.to(t.device)]


def conv_patches(x: torch.Tensor, conv: nn.modules.conv._ConvNd, flat: torch.Tensor,
                 grid: tuple[int, ...]) -> torch.Tensor:
    """(P, C_in, *kernel): the input patch that `conv` reads for each output position `flat` of
    its output grid (N, *spatial), from its input x (N, C_in, *spatial_in); the sampled columns
    of F.unfold without unfolding the whole input."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode)
    coords = [c.to(x.device) for c in torch.unravel_index(flat, grid)]
    d = len(conv.kernel_size)
    index = [coords[0].view(-1, 1, *[1] * d), torch.arange(x.shape[1], device=x.device).view(1, -1, *[1] * d)]
    for i, (k, s, dil) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        shape = [-1, 1] + [1] * d
        shape[2 + i] = k
        index.append((coords[1 + i][:, None] * s + torch.arange(k, device=x.device) * dil).view(shape))
    return padded[tuple(index)]


def layer_features(layer: nn.Module, x: torch.Tensor, flat: torch.Tensor, grid) -> torch.Tensor:
    """(P, g, D): the features of `layer` (conv or Linear) at the sampled output positions, per
    group g of a grouped conv (1 otherwise), in the order of its weight's flattened rows."""
    if isinstance(layer, nn.Linear):
        return rows_at(x, flat, False)[:, None, :]
    patches = conv_patches(x, layer, flat, grid)
    return patches.reshape(len(patches), layer.groups, -1)


def _groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


class NormalEquations:
    """Running sums of XᵀX (g, D, D), XᵀY (g, D, C) and ΣY² in float64 over rows of features X
    (P, g, D) and targets Y (P, g, C), for a ridge solve (one independent system per group g)."""

    def __init__(self):
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.energy = 0.0
        self.rows = 0

    def add(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        x, y = features.transpose(0, 1).float(), targets.transpose(0, 1).float()
        gram = torch.bmm(x.transpose(1, 2), x).double()
        cross = torch.bmm(x.transpose(1, 2), y).double()
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.energy += float(y.double().square().sum())
        self.rows += len(features)

    def relative_error(self, solution: torch.Tensor) -> float:
        """Σ‖XW − Y‖² / ΣY² of weights `solution` (g, D, C) on the accumulated rows."""
        w = solution.to(self.gram)
        fit = (w * (self.gram @ w)).sum() - 2 * (w * self.cross).sum() + self.energy
        return float(fit.clamp_min(0)) / max(self.energy, 1e-300)


def ridge_solution(equations: NormalEquations, prior: torch.Tensor, alpha: float = RIDGE) -> torch.Tensor:
    """(g, D, C) float64: argmin ‖XW − Y‖²/rows + λ‖W − prior‖², λ = alpha × the mean diagonal
    of XᵀX/rows per group, by Cholesky. prior: (g, D, C), the current weights."""
    if equations.gram is None:
        raise IntraFusionError("no calibration rows reached the layer: nothing to fit")
    gram, cross = equations.gram / equations.rows, equations.cross / equations.rows
    lam = alpha * gram.diagonal(dim1=1, dim2=2).mean(1).view(-1, 1, 1) + 1e-12
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.cholesky_solve(cross + lam * prior.to(gram), torch.linalg.cholesky(gram + lam * eye))


def has_bias(layers) -> bool:
    return any(layer.bias is not None for layer in layers)


def prior_weights(layers) -> torch.Tensor:
    """(g, D, C): the layers' current weights in the layout of their concatenated features
    (layer_features of each, then a ones row holding the sum of their biases, if any has one)."""
    c, g = layers[0].weight.shape[0], _groups(layers[0])
    blocks = [layer.weight.detach().reshape(g, c // g, -1).transpose(1, 2) for layer in layers]
    if has_bias(layers):
        bias = sum(layer.bias.detach() for layer in layers if layer.bias is not None)
        blocks.append(bias.reshape(g, 1, c // g))
    return torch.cat(blocks, 1)


@torch.no_grad()
def set_weights(layers, solution: torch.Tensor) -> None:
    """Write `solution` (g, D, C) (the layout of prior_weights) into the layers, in place; the
    bias goes to the first layer that has one, the others' biases become zero."""
    start = 0
    for layer in layers:
        w = layer.weight
        size = w[0].numel()
        block = solution[:, start:start + size].transpose(1, 2)
        w.copy_(block.reshape(w.shape).to(w))
        start += size
    biased = [layer for layer in layers if layer.bias is not None]
    for i, layer in enumerate(biased):
        layer.bias.copy_(solution[:, -1].reshape(-1).to(layer.bias) if i == 0 else 0)


def refit_linear(layer: nn.Linear, equations: NormalEquations, alpha: float = RIDGE) -> float:
    """Refit `layer` in place from `equations` accumulated with linear_rows(layer, x) and the
    target outputs (P, 1, out_features); the relative error of the new weights on those rows.
    The building block for refitting one Linear layer outside `reconstruct` (e.g. a decoder
    LM's MLP down-projection, fed the pruned model's input and the unpruned output)."""
    solution = ridge_solution(equations, prior_weights([layer]), alpha)
    set_weights([layer], solution)
    return equations.relative_error(solution)


def linear_rows(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """(P, 1, D): the rows of `layer`'s input x (..., in_features), with a ones column if the
    layer has a bias: the features NormalEquations.add takes for refit_linear."""
    rows = x.reshape(-1, x.shape[-1])[:, None, :]
    return with_ones(rows) if layer.bias is not None else rows


def with_ones(features: torch.Tensor) -> torch.Tensor:
    """(P, g, D + 1): `features` (P, g, D) with a ones column (the bias)."""
    return torch.cat([features, features.new_ones(*features.shape[:2], 1)], 2)


class _Captured(Exception):
    """Raised by a hook once everything a fit needs from a forward pass is captured."""


class _Misaligned(Exception):
    """Raised by a hook when a Linear layer's positions are not those of the unpruned network:
    the leading axes of its input were pruned (the Mixer's token MLP, which runs along the
    channels of the embedding), so no row of one network is a row of the other."""


def _segment_index(name: str, segments) -> int | None:
    for i, (names, _) in enumerate(segments):
        if any(name == n or name.startswith(n + ".") or not n for n in names):
            return i
    return None


def _hooked(modules: dict, hooks: list[tuple[str, str, callable]]):
    """Register (module name, "pre" | "post", fn) hooks; the handles."""
    return [modules[n].register_forward_pre_hook(fn) if kind == "pre" else modules[n].register_forward_hook(fn)
            for n, kind, fn in hooks]


class _Fit:
    """One unit's fit: its layers in both networks, the kept channels, and per calibration batch
    the sampled positions and the unpruned target there."""

    def __init__(self, unit: Unit, model: nn.Module, channel_map, positions: int, batches: int, seed: int):
        self.unit = unit
        self.layers = [model.get_submodule(n) for n in unit.layers]
        first = self.layers[0]
        if not all(_groups(layer) == _groups(first) and type(layer) is type(first) for layer in self.layers):
            raise IntraFusionError(f"layers {', '.join(unit.layers)} write into one add but differ in kind")
        self.channels_first = not isinstance(first, nn.Linear)
        self.kept = channel_map[unit.layers[0]]
        self.per_batch = -(-positions // batches)
        self.seed = seed + zlib.crc32(unit.layers[0].encode())
        self.flat: dict[int, torch.Tensor] = {}
        self.grid: dict[int, tuple] = {}
        self.target: dict[int, torch.Tensor] = {}
        self.added: set = set()

    def sampled(self, batch: int, t: torch.Tensor) -> torch.Tensor:
        """The sampled flat positions of this batch, drawn on first sight of a tensor on the grid."""
        if batch not in self.flat:
            self.grid[batch] = grid = position_grid(t, self.channels_first)
            total = 1
            for size in grid:
                total *= size
            self.flat[batch] = sample_positions(total, self.per_batch, self.seed + batch)
        return self.flat[batch]

    def add_target(self, batch: int, key, t: torch.Tensor) -> None:
        """Add the unpruned `t` (a layer's output or the shortcut, once per batch) at the kept
        channels and sampled positions to the batch's target."""
        if (batch, key) in self.added:
            return
        self.added.add((batch, key))
        values = rows_at(t, self.sampled(batch, t), self.channels_first)[:, self.kept.to(t.device)].float()
        self.target[batch] = values if batch not in self.target else self.target[batch] + values

    def reference_hooks(self, batch: list[int]) -> list[tuple]:
        """Hooks summing the unpruned outputs (and shortcut) at the sampled positions into the
        target of the batch batch[0]."""
        hooks = [(n, "post", lambda m, i, out, n=n: self.add_target(batch[0], n, out)) for n in self.unit.layers]
        if self.unit.through:
            name, index = self.unit.through
            hooks.append((name, "pre", lambda m, args: self.add_target(batch[0], None, args[index])))
        return hooks

    def capture(self, model: nn.Module, segment, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (P, g, D), targets (P, g, C)) of one batch: the pruned network's inputs to
        the unit's layers at the sampled positions, and the unpruned target minus the pruned
        network's shortcut there; the segment's forward pass stops once they are captured."""
        flat, grid = self.flat[batch], self.grid[batch]
        seen: dict = {}
        wanted = len(self.layers) + bool(self.unit.through)

        def rows(m, x):
            if isinstance(m, nn.Linear) and tuple(x.shape[:-1]) != grid:
                raise _Misaligned
            return layer_features(m, x, flat, grid)

        def keep(key, value):
            if key not in seen:
                seen[key] = value
            if len(seen) == wanted:
                raise _Captured

        hooks = [(n, "pre", lambda m, args, n=n: keep(n, rows(m, args[0]))) for n in self.unit.layers]
        if self.unit.through:
            name, index = self.unit.through
            hooks.append((name, "pre", lambda m, args: keep(None, rows_at(args[index], flat, self.channels_first))))
        handles = _hooked(dict(model.named_modules()), hooks)
        try:
            segment(model, x.clone())
        except _Captured:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(seen) < wanted:
            raise IntraFusionError(f"layers {', '.join(self.unit.layers)} did not all run in one forward pass")
        features = torch.cat([seen[n].float() for n in self.unit.layers], 2)
        if has_bias(self.layers):
            features = with_ones(features)
        target = self.target[batch].to(features.device)
        if self.unit.through:
            target = target - seen[None].float()
        g = features.shape[1]
        return features, target.reshape(len(target), g, -1)

    def solve(self, model, segment, entering: list[torch.Tensor], alpha: float) -> tuple[float, float] | None:
        """Refit the unit's layers in place; (relative error before, after) on the sampled rows,
        None when its rows cannot be matched (_Misaligned: the layers are left as they are)."""
        equations = NormalEquations()
        try:
            for b, x in enumerate(entering):
                equations.add(*self.capture(model, segment, x, b))
        except _Misaligned:
            self.target.clear()
            self.added.clear()
            return None
        prior = prior_weights(self.layers)
        solution = ridge_solution(equations, prior, alpha)
        set_weights(self.layers, solution)
        self.target.clear()
        self.added.clear()
        return equations.relative_error(prior.double()), equations.relative_error(solution)


def _whole(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@torch.no_grad()
def reconstruct(reference: nn.Module, model: nn.Module, channel_map: dict, layer_names, batches,
                entering: list[torch.Tensor] | None = None, start: int = 0, alpha: float = RIDGE,
                positions: int = POSITIONS, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Refit the named conv/linear layers of `model` (a pruned copy of the network `reference`)
    in place, in execution order (see the module docstring); {refit layer: (relative error of
    its unit before, after)} on the unit's sampled rows. A Linear layer whose rows the two
    networks do not share (its input's leading axes pruned) is left as it is.

    channel_map: Pruner.channel_map of `model` (each kept out-channel's index in `reference`).
    batches: calibration input tensors. entering: reference's activations entering segment
    `start` for each batch, where the two networks start to differ (default: computed from the
    batches); a model without segments runs whole. positions: sampled output positions per layer
    over all batches."""
    batches = _inputs(batches)
    segments = model_segments(reference)
    units = fit_units(execution_order(model, batches[0][:1]), layer_names, residual_units(model))
    where = None
    if segments is not None:
        where = [{_segment_index(n, segments) for n in (*u.layers, *(u.through[:1] if u.through else ()))}
                 for u in units]
    if segments is None or any(len(w) != 1 or None in w for w in where):
        segments, start, entering = [(("",), _whole)], 0, None
        where = [{0}] * len(units)
    if entering is None:
        entering = []
        for x in batches:
            for _, fn in segments[:start]:
                x = fn(reference, x)
            entering.append(x)
    modules = dict(reference.named_modules())
    fits = [(next(iter(w)), _Fit(u, model, channel_map, positions, len(batches), seed))
            for u, w in zip(units, where)]
    if any(i < start for i, _ in fits):
        raise IntraFusionError(f"a layer to refit runs before segment {start}, where the networks "
                               "were said to start to differ")
    x_ref, x_var = [x.clone() for x in entering], [x.clone() for x in entering]
    errors = {}
    was = reference.training, model.training
    reference.eval(), model.eval()
    try:
        last = max((i for i, _ in fits), default=start - 1)
        for index in range(start, last + 1):
            here = [f for i, f in fits if i == index]
            fn = segments[index][1]
            batch = [0]
            handles = _hooked(modules, [h for f in here for h in f.reference_hooks(batch)])
            try:
                for b in range(len(x_ref)):
                    batch[0] = b
                    x_ref[b] = fn(reference, x_ref[b])
            finally:
                for h in handles:
                    h.remove()
            for f in here:
                fitted = f.solve(model, fn, x_var, alpha)
                if fitted is not None:
                    errors.update(dict.fromkeys(f.unit.layers, fitted))
            for b in range(len(x_var) if index < last else 0):
                x_var[b] = fn(model, x_var[b])
    finally:
        reference.train(was[0]), model.train(was[1])
    return errors


def reconstruct_pruned(base, variant, batches, alpha: float = RIDGE, positions: int = POSITIONS) -> list[str]:
    """Reconstruct `variant` (a pruned copy of Pruner `base`) in place on `batches` ((x, y)
    pairs, input tensors, or RepairInputs of base's network, whose cached activations skip the
    unchanged segments); the names of the refit layers: every conv/linear layer from the first
    changed one on, in execution order, the classifier included (but see `reconstruct`)."""
    inputs = batches if isinstance(batches, RepairInputs) else RepairInputs(base.model, batches, cache_mb=0)
    images = _inputs(inputs.batches)
    layers = layers_to_repair(base.model, variant.model, images[0][:1])
    if not layers:
        return layers
    start, entering = 0, None
    if inputs.segments is not None:
        start = first_changed_segment(base.model, variant.model, inputs.segments)
        if start and isinstance(batches, RepairInputs):
            entering = list(torch.split(inputs.activations(start), [len(x) for x in images]))
    errors = reconstruct(base.model, variant.model, variant.channel_map, layers, images, entering, start,
                         alpha, positions)
    return [n for n in layers if n in errors]
