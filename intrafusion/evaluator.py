"""Data-major evaluation of pruned variants that reuses the unpruned network's work.

Pruning a group changes only some layers; everything before the first changed layer computes the
same activations as in the unpruned network. The network is split into a chain of segments whose
composition is its forward pass (VGG: each `features` module, then the classifier; ResNet: stem,
each residual block, then the head). `GridEvaluator.evaluate` takes all pending variants at once
and reads the images batch by batch: for each batch the unpruned network runs once, keeping the
activations entering every variant's first changed segment, and each variant runs only its suffix
on them. The first pass also runs the unpruned network to its end, which gives its own accuracy.

With BN folded, a variant's first changed conv/linear layer is a linear map of the unpruned
layer's output (its input is still the unpruned one): default pruning keeps a subset of its rows
(the output is a channel slice, exactly), fusion and repair mix them (W' = A·W, b' = A·b + c: the
output is A·y + c, equal up to float rounding). That output is computed from the unpruned layer's,
captured during the base run, instead of running the layer again (`LayerMap`).

Memory holds one batch of activations per kept boundary, not the test set. Models that cannot be
split run every variant's whole forward pass on each batch.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import (EVAL_BATCH, first_changed_segment, logits, model_segments, same_state,
                         scored_count, scored_pairs)
from .repair import execution_order

METRICS = ("accuracy", "cross_entropy")  # means over the predictions; "predictions" gives them each
DERIVED = {"perplexity": ("cross_entropy", math.exp)}  # language models: exp(mean token NLL)
MIX_TOLERANCE = 1e-5  # relative residual ‖A·W − W'‖ / ‖W'‖ up to which a layer counts as a mix


def share_unchanged(base: nn.Module, variant: nn.Module) -> None:
    """Let every parameter and buffer of `variant` that equals the one of the same name in `base`
    use `base`'s storage, so that a variant waiting for evaluation holds only what pruning
    changed. A variant to be trained must call `own_storage` first."""
    reference = base.state_dict(keep_vars=True)
    for name, t in variant.state_dict(keep_vars=True).items():
        b = reference.get(name)
        if b is not None and b.shape == t.shape and b.dtype == t.dtype and torch.equal(b, t):
            t.data = b.data


def own_storage(base: nn.Module, variant: nn.Module) -> None:
    """Undo `share_unchanged`: copy every tensor of `variant` that uses `base`'s storage."""
    shared = {t.data_ptr() for t in base.state_dict().values()}
    for t in variant.state_dict(keep_vars=True).values():
        if t.data_ptr() in shared:
            t.data = t.data.clone()


def _bias(layer: nn.Module) -> torch.Tensor:
    out = layer.weight.shape[0]
    return layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(out)


@dataclass
class LayerMap:
    """How a variant's layer `name` computes its output from the unpruned layer's output y for the
    same input: y's channels `rows` (k,), exactly, or mix (k, n) · y + shift (k,), along the
    channel axis `dim` (1 for convolutions, -1 for Linear)."""

    name: str
    dim: int
    rows: torch.Tensor | None = None
    mix: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """The variant layer's output from the unpruned one, y (B, n, H, W) or (…, n)."""
        if self.rows is not None:
            return y.index_select(self.dim, self.rows)
        if self.dim == -1:
            return F.linear(y, self.mix, self.shift)
        return F.conv2d(y, self.mix[:, :, None, None], self.shift)

    def macs(self, out_positions: int) -> int:
        """Multiply-accumulates of computing one image's output at `out_positions` positions."""
        return 0 if self.mix is None else self.mix.numel() * out_positions


def layer_map(name: str, base_layer: nn.Module, layer: nn.Module,
              rows: torch.Tensor | None = None) -> LayerMap | None:
    """`layer` (a pruned copy of `base_layer`) as a LayerMap of base_layer's output, or None.

    rows (k,): the base rows the variant's rows came from (Pruner.channel_map), tried first as an
    exact slice. Otherwise, if mixing n channels costs less than the layer's m = in·kh·kw
    multiply-accumulates per output, A is solved from W' = A·W by least squares (in float64, on
    2n of the m flattened weight columns: n independent ones fix A) and kept if the residual over
    all columns is within MIX_TOLERANCE (any solution then works: only A·W matters)."""
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) or type(layer) is not type(base_layer):
        return None
    if getattr(layer, "groups", 1) != 1:
        return None
    w0, w = base_layer.weight.detach().flatten(1), layer.weight.detach().flatten(1)
    if w0.shape[1] != w.shape[1]:
        return None
    b0, b = _bias(base_layer), _bias(layer)
    dim = -1 if isinstance(layer, nn.Linear) else 1
    rows = rows if rows is None else rows.to(w.device)
    if rows is not None and torch.equal(w, w0[rows]) and torch.equal(b, b0[rows]):
        return LayerMap(name, dim, rows=rows)
    n, m = w0.shape
    if n >= m:
        return None
    cols = torch.linspace(0, m - 1, min(m, 2 * n), device=w.device).long()
    mix = torch.linalg.lstsq(w0[:, cols].T.double(), w[:, cols].T.double()).solution.T
    if (mix.to(w.dtype) @ w0 - w).norm() > MIX_TOLERANCE * w.norm():
        return None
    shift = b.double() - mix @ b0.double()
    return LayerMap(name, dim, mix=mix.to(w.dtype), shift=shift.to(w.dtype))


def _rows(base_map: torch.Tensor | None, variant_map: torch.Tensor | None) -> torch.Tensor | None:
    """Positions in base_map (ascending channel indices) of variant_map's; None if not a subset."""
    if base_map is None or variant_map is None or not len(base_map):
        return None
    pos = torch.searchsorted(base_map, variant_map).clamp_max(len(base_map) - 1)
    return pos if torch.equal(base_map[pos], variant_map) else None


@dataclass
class Route:
    """How a variant is evaluated: from segment `start` on (None: the whole forward pass), its
    first changed layer computed from the unpruned one by `reuse` (None: run)."""

    start: int | None
    reuse: LayerMap | None = None


class _Replay(nn.Module):
    """Stands in for a variant's layer during its suffix run: returns `output`, set per batch."""

    def __init__(self):
        super().__init__()
        self.output: torch.Tensor | None = None

    def forward(self, *_):
        return self.output


@contextmanager
def _replaced(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent)
    original = getattr(owner, child)
    setattr(owner, child, module)
    try:
        yield module
    finally:
        setattr(owner, child, original)


def _score(out: torch.Tensor, y: torch.Tensor, metric: str):
    """Of a batch's logits (B, classes) or a language model's (B, L, vocab) (scored_pairs): the
    number of correct predictions, the summed cross-entropy, or the predictions."""
    out, y = scored_pairs(out, y)
    if metric == "accuracy":
        return int((out.argmax(1) == y).sum())
    if metric == "cross_entropy":
        return float(F.cross_entropy(out.float(), y, reduction="sum"))
    return out.argmax(1).cpu()


def _total(parts: list, metric: str, count: int):
    """The metric over the predictions from its batches' `_score`s: a mean, or all of them."""
    return torch.cat(parts) if metric == "predictions" else sum(parts) / max(count, 1)


def shard_slice(count: int, batch_size: int, index: int, shards: int) -> slice:
    """The images of part `index` of `shards`: a run of whole batches of `batch_size` (so that
    every image sits in the batch it has in a whole pass), the batches split as evenly as they go."""
    batches = -(-count // batch_size)
    start, stop = (batches * index) // shards, (batches * (index + 1)) // shards
    return slice(start * batch_size, min(stop * batch_size, count))


class GridEvaluator:
    """Accuracy (or mean cross-entropy) of pruned copies of `base` (a Pruner: anything holding
    the network as `.model`) on test tensors (N, 3, H, W), (N,), in batches of `batch_size`; for a
    language model the token windows (N, L) are both the inputs and the labels (next-token
    accuracy, mean token NLL, and DERIVED's perplexity).

    fast=False evaluates every variant by itself with a full forward pass, and the unpruned
    network with a pass of its own (the naive path). `stats` counts, per pass, the batches, the
    unpruned segments run, and the variants run whole, from a segment, and with a reused layer."""

    def __init__(self, base, images: torch.Tensor, labels: torch.Tensor, fast: bool = True,
                 batch_size: int = EVAL_BATCH):
        self.base, self.images, self.labels, self.fast = base, images, labels, fast
        self.batch_size = batch_size
        self.device = next(base.model.parameters()).device
        self.segments = model_segments(base.model) if fast else None
        self.stats = {"passes": 0, "batches": 0, "base_segments": 0, "full": 0, "suffix": 0, "reused": 0}
        self._unpruned: dict[str, float] | None = None
        self._order: list[str] | None = None
        if self.segments is not None and not self._chain_matches():
            self.segments = None

    def _run(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for _, fn in self.segments[start:stop]:
            x = fn(model, x)
        return x

    def _batches(self):
        for s in range(0, len(self.labels), self.batch_size):
            yield (self.images[s:s + self.batch_size].to(self.device),
                   self.labels[s:s + self.batch_size].to(self.device))

    @torch.inference_mode()
    def _chain_matches(self) -> bool:
        model = self.base.model.eval()
        x = self.images[:2].to(self.device)
        return torch.equal(self._run(model, x, 0, len(self.segments)), logits(model, x))

    def unpruned(self, metric: str = "accuracy") -> float:
        """The unpruned network's metric (METRICS or DERIVED): from the first `evaluate` pass, or
        from a pass of its own if there was none (always on the naive path)."""
        if metric in DERIVED:
            source, fn = DERIVED[metric]
            return fn(self.unpruned(source))
        if self._unpruned is None and self.fast:
            self.evaluate([])
        elif self._unpruned is None:
            self._unpruned = dict(zip(METRICS, self._full(self.base.model.eval(), METRICS)))
        return self._unpruned[metric]

    @property
    def base_accuracy(self) -> float:
        return self.unpruned("accuracy")

    def accuracy(self, variant) -> float:
        """Test accuracy of `variant` (a pruned copy of base)."""
        return self.evaluate([variant])[0]

    def route(self, variant) -> Route:
        """Where `variant`'s evaluation starts and whether its first changed layer is reused: the
        first conv/linear layer of the first changed segment whose parameters differ (the layers
        before it are unchanged, so its input is the unpruned one)."""
        if self.segments is None:
            return Route(None)
        base, model = self.base.model, variant.model
        start = first_changed_segment(base, model, self.segments)
        held = self.segments[start][0]
        if self._order is None:
            self._order = execution_order(base, self.images[:1])
        for name in self._order:
            if not any(name == h or name.startswith(h + ".") for h in held):
                continue
            a, b = base.get_submodule(name), model.get_submodule(name)
            if not same_state(a, b):
                rows = _rows(getattr(self.base, "channel_map", {}).get(name),
                             getattr(variant, "channel_map", {}).get(name))
                return Route(start, layer_map(name, a, b, rows))
        return Route(start)

    def evaluate(self, variants, metric: str = "accuracy") -> list:
        """`metric` of every variant (pruned copies of base), in one pass over the batches:
        "accuracy" or "cross_entropy" (means over the images, floats) or "predictions" (N,);
        the unpruned network's metrics come from the same pass if not yet known."""
        if metric in DERIVED:
            source, fn = DERIVED[metric]
            return [fn(v) for v in self.evaluate(variants, source)]
        if metric not in (*METRICS, "predictions"):
            raise ValueError(f"metric must be one of {(*METRICS, *DERIVED)} or 'predictions', got {metric!r}")
        models = [v.model.eval() for v in variants]
        if not self.fast:
            return [self._full(m, [metric])[0] for m in models]
        routes = [self.route(v) for v in variants]
        self.stats["passes"] += 1
        return self._pass(models, routes, metric)

    @torch.inference_mode()
    def _full(self, model: nn.Module, metrics) -> list:
        """The naive path: each of `metrics` of `model`'s whole forward pass on every batch."""
        self.stats["full"] += 1
        parts = {m: [] for m in metrics}
        for x, y in self._batches():
            out = logits(model, x)
            for m in metrics:
                parts[m].append(_score(out, y, m))
        return [_total(parts[m], m, scored_count(self.labels)) for m in metrics]

    @torch.inference_mode()
    def _pass(self, models: list[nn.Module], routes: list[Route], metric: str) -> list:
        parts = [[] for _ in models]
        base_totals = dict.fromkeys(METRICS, 0.0)
        captured: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            replays = [stack.enter_context(_replaced(m, r.reuse.name, _Replay())) if r.reuse else None
                       for m, r in zip(models, routes)]
            for name in {r.reuse.name for r in routes if r.reuse}:  # a copy: an in-place ReLU may follow
                hook = self.base.model.get_submodule(name).register_forward_hook(
                    lambda _m, _i, out, name=name: captured.__setitem__(name, out.clone()))
                stack.callback(hook.remove)
            for x, y in self._batches():
                inputs, base_out = self._base_batch(x, routes)
                if base_out is not None:
                    for m in METRICS:
                        base_totals[m] += _score(base_out, y, m)
                for i, (model, route, replay) in enumerate(zip(models, routes, replays)):
                    if route.start is None:
                        out = logits(model, x)
                    else:
                        if replay is not None:
                            replay.output = route.reuse(captured[route.reuse.name])
                        out = self._run(model, inputs[route.start], route.start, len(self.segments))
                        if replay is not None:
                            replay.output = None
                    parts[i].append(_score(out, y, metric))
                inputs.clear()
                captured.clear()
        self._count(routes)
        if self._unpruned is None:
            self._unpruned = {m: v / max(scored_count(self.labels), 1) for m, v in base_totals.items()}
        return [_total(p, metric, scored_count(self.labels)) for p in parts]

    def _base_batch(self, x: torch.Tensor, routes: list[Route]):
        """Run the unpruned network on batch x as far as the routes need (to the end while its own
        metrics are unknown); the activations entering each route's start segment, and the
        logits when it ran to the end (else None). Reused layers' outputs are captured by hooks."""
        model = self.base.model.eval()
        self.stats["batches"] += 1
        if self.segments is None:
            return {}, logits(model, x) if self._unpruned is None else None
        starts = {r.start for r in routes}
        stop = len(self.segments) if self._unpruned is None else max(
            [r.start + (r.reuse is not None) for r in routes], default=0)
        inputs = {}
        for k in range(stop):
            if k in starts:
                inputs[k] = x
            x = self.segments[k][1](model, x)
        if stop in starts:
            inputs[stop] = x
        self.stats["base_segments"] += stop
        return inputs, x if stop == len(self.segments) else None

    def _count(self, routes: list[Route]) -> None:
        for r in routes:
            self.stats["full" if r.start is None else "suffix"] += 1
            self.stats["reused"] += r.reuse is not None
