"""Evaluation of pruned variants that reuses the unpruned prefix of the network.

Pruning a group changes only some layers; everything before the first changed layer computes the
same activations as in the unpruned network. The network is split into a chain of segments whose
composition is its forward pass (VGG: each `features` module, then the classifier; ResNet: stem,
each residual block, then the head). The test-set activations entering a segment are computed
once from the unpruned network and cached (within a memory budget), and each variant runs only
from its first changed segment on. Prefixes are nested, so each is computed from the deepest
cached one before it, and the first pass also keeps the planned shallower ones (`plan`): every
unpruned segment then runs once per test set. Batches are the same as in a full forward pass, so
the accuracies are identical to the last image. Models that cannot be split use the full forward.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from ..evaluation import count_correct

Segment = tuple[tuple[str, ...], Callable[[nn.Module, torch.Tensor], torch.Tensor]]


def model_segments(model: nn.Module) -> list[Segment] | None:
    """The chain of (module names, fn(model, x)) whose composition is model(x), as the model
    supplies it through a `segments()` method; None for a model that does not (full forward)."""
    segments = getattr(model, "segments", None)
    return segments() if callable(segments) else None


def _state_of(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
    return [(f"{n}.{k}", v) for n in names for k, v in model.get_submodule(n).state_dict().items()]


def first_changed_segment(base: nn.Module, variant: nn.Module, segments: list[Segment]) -> int:
    """Index of the first segment whose parameters or buffers differ between the two models."""
    for i, (names, _) in enumerate(segments):
        for (_, a), (_, b) in zip(_state_of(base, names), _state_of(variant, names)):
            if a.shape != b.shape or not torch.equal(a, b):
                return i
    return len(segments) - 1


def segment_of(segments: list[Segment], names) -> int:
    """Index of the first segment holding one of the modules `names` (dotted paths), else the last."""
    for i, (held, _) in enumerate(segments):
        if any(n == h or n.startswith(h + ".") for h in held for n in names):
            return i
    return len(segments) - 1


class GridEvaluator:
    """Accuracy of pruned copies of `base` (a Pruner) on test tensors (N, 3, H, W), (N,).

    fast=False evaluates every variant with a full forward pass. `cache_mb` bounds the memory of
    cached prefix activations; a prefix that does not fit is not cached (full forward instead)."""

    def __init__(self, base, images: torch.Tensor, labels: torch.Tensor, fast: bool = True,
                 cache_mb: float = 2048, batch_size: int = 1000):
        self.base, self.images, self.labels, self.fast = base, images, labels, fast
        self.batch_size, self.budget = batch_size, cache_mb * 2 ** 20
        self.device = next(base.model.parameters()).device
        self.segments = model_segments(base.model) if fast else None
        self.cache: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self.planned: set[int] = set()
        self.stats = {"full": 0, "suffix": 0, "prefix_computed": 0}
        if self.segments is not None and not self._chain_matches():
            self.segments = None

    def plan(self, groups) -> None:
        """Announce the group indices the variants to come will prune, so that their prefixes are
        computed together in one pass. A hint only: each variant's start is still found by
        comparing its parameters with the base."""
        if self.segments is not None:
            self.planned = {segment_of(self.segments, self.base.changed_modules(g)) for g in groups} - {0}

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
        return torch.equal(self._run(model, x, 0, len(self.segments)), model(x))

    def _cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for acts in self.cache.values() for t in acts)

    @torch.inference_mode()
    def _prefix(self, index: int) -> list[torch.Tensor] | None:
        """Activations entering segment `index` for every test batch, from the unpruned model.

        Runs from the deepest cached prefix before `index` (or the input), and on the way keeps
        the planned prefixes not yet cached while they fit the budget."""
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        model = self.base.model.eval()
        sizes, probe = [], self.images[:1].to(self.device)
        for _, fn in self.segments[:index + 1]:
            sizes.append(probe.numel() * probe.element_size() * len(self.labels))
            probe = fn(model, probe)
        if sizes[index] > self.budget:
            return None
        while self.cache and self._cache_bytes() + sizes[index] > self.budget:
            self.cache.popitem(last=False)
        source = max((k for k in self.cache if k < index), default=0)
        keep, used = [], self._cache_bytes() + sizes[index]
        for k in sorted(self.planned - self.cache.keys()):
            if source < k < index and used + sizes[k] <= self.budget:
                keep.append(k)
                used += sizes[k]
        inputs = self.cache[source] if source else [images for images, _ in self._batches()]
        acts = {k: [] for k in [*keep, index]}
        for x in inputs:
            for k in range(source, index):
                if k in acts:
                    acts[k].append(x)
                x = self.segments[k][1](model, x)
            acts[index].append(x)
        for k in sorted(acts):
            self.cache[k] = acts[k]
        self.stats["prefix_computed"] += len(acts)
        return acts[index]

    def accuracy(self, variant) -> float:
        """Test accuracy of `variant` (a pruned copy of base)."""
        model = variant.model.eval()
        if self.segments is not None:
            start = first_changed_segment(self.base.model, model, self.segments)
            acts = self._prefix(start) if start > 0 else None
            if acts is not None:
                correct = 0
                with torch.inference_mode():
                    for a, (_, y) in zip(acts, self._batches()):
                        out = self._run(model, a, start, len(self.segments))
                        correct += int((out.argmax(1) == y).sum())
                self.stats["suffix"] += 1
                return correct / max(len(self.labels), 1)
        self.stats["full"] += 1
        return count_correct(model, self.images, self.labels, self.batch_size) / max(len(self.labels), 1)
