"""The sensitivity profile: each group pruned alone at a ladder of sparsities with the chosen
method (`measure_profile`), its loss measured on held-out *training* images through the
data-major evaluator (`HeldOutLoss`), and a JSON cache of profiles keyed by what they depend on.

The loss is the increase of the mean cross-entropy on the held-out images. Cross-entropy rather
than the accuracy drop: on a thousand images the accuracy moves in steps of 0.1 pt and
single-group drops are not even monotone in the sparsity (measured), so a solve would chase
noise; the cross-entropy is continuous, sees a confident error growing before it flips a
prediction, and unlike the KL to the unpruned outputs it does not penalize a change that makes
the network more right on the labels.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..errors import IntraFusionError
from ..evaluator import GridEvaluator, share_unchanged
from ..groups import Pruner
from ..storage import atomic_write

LADDER = (0.2, 0.4, 0.6, 0.8)   # sparsities at which each group is profiled
Profile = dict[int, list[tuple[float, float]]]  # group -> [(sparsity, predicted loss)], ladder order


class HeldOutLoss:
    """Mean cross-entropy of pruned copies of `base` on held-out images (N, 3, H, W) and labels
    (N,), through the data-major evaluator (evaluator.py: the unpruned network runs once
    per batch and each variant only from its first changed layer on)."""

    def __init__(self, base: Pruner, images: torch.Tensor, labels: torch.Tensor):
        self.evaluator = GridEvaluator(base, images, labels)
        self.base = base

    @property
    def unpruned(self) -> float:
        """The unpruned network's loss (from the first pass)."""
        return self.evaluator.unpruned("cross_entropy")

    def hold(self, variant: Pruner) -> Pruner:
        """`variant`, sharing its unchanged tensors with the base while it waits to be evaluated
        (it must not be trained afterwards)."""
        share_unchanged(self.base.model, variant.model)
        return variant

    def losses(self, variants: list[Pruner]) -> list[float]:
        """The loss of each variant, all evaluated in one pass over the images."""
        return self.evaluator.evaluate(variants, "cross_entropy")

    def __call__(self, variant: Pruner) -> float:
        return self.losses([variant])[0]


def measure_profile(base: Pruner, prune, loss: HeldOutLoss, groups, ladder=LADDER) -> Profile:
    """{group: [(s, loss(s) − loss(unpruned))]}: each group pruned alone at each ladder sparsity
    by prune(variant, group, sparsity) (the method, with its repair), rungs a group cannot take
    (no channel, or no attention head, left: Pruner.check_prunable) skipped. The rungs of a
    group are evaluated together, in one pass over the held-out images."""
    profile: Profile = {}
    for g in groups:
        rungs, variants = [], []
        with base.keeping_distances():
            for s in ladder:
                try:
                    base.check_prunable(g, s)
                except IntraFusionError:
                    continue
                variant = base.copy()
                prune(variant, {g: s})
                rungs.append(s)
                variants.append(loss.hold(variant))
        profile[g] = [(s, value - loss.unpruned) for s, value in zip(rungs, loss.losses(variants))]
    return profile


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' shapes and bytes (the held-out images, a model's state)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def profile_key(settings: dict) -> str:
    """The cache key of a profile: sha256 of its settings (model digest, method, criterion,
    fusion settings, ladder, held-out and calibration digests) as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def read_profile(path: Path | str | None, key: str) -> Profile | None:
    """The cached profile of `key` in the JSON file `path`, or None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        entry = json.loads(Path(path).read_text()).get(key)
    except (OSError, ValueError):
        return None
    if not entry:
        return None
    return {int(g): [tuple(p) for p in pts] for g, pts in entry["profile"].items()}


def write_profile(path: Path | str | None, key: str, settings: dict, profile: Profile, seconds: float,
                  cpu_seconds: float = 0.0) -> None:
    """Add (or replace) the profile of `key` in the JSON cache `path`, atomically."""
    if path is None:
        return
    path = Path(path)
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    cache[key] = {"settings": settings, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                  "profile": {str(g): [list(p) for p in pts] for g, pts in profile.items()}}
    atomic_write(path, json.dumps(cache, indent=1, default=str).encode(), "rerun to measure it again")


def cached_profile(cache: Path | str | None, settings: dict, measure) -> tuple[Profile, float, float]:
    """(profile, wall seconds, CPU seconds spent measuring): from the cache when it holds
    `settings` (0, 0), else measure() and stored. CPU seconds (all threads of this process) are
    what a shared machine cannot inflate by making the process wait."""
    key = profile_key(settings)
    profile = read_profile(cache, key)
    if profile is not None:
        return profile, 0.0, 0.0
    start, cpu = time.perf_counter(), time.process_time()
    profile = measure()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    write_profile(cache, key, settings, profile, seconds, cpu)
    return profile, seconds, cpu
