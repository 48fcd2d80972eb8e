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


def profile_rungs(base: Pruner, groups, ladder=LADDER) -> list[list[tuple[int, float]]]:
    """The rungs (group, sparsity) of the profile, one list per group in `groups`: its ladder
    sparsities that leave it a channel (and an attention head: Pruner.check_prunable)."""
    rungs = []
    for g in groups:
        taken = []
        for s in ladder:
            try:
                base.check_prunable(g, s)
            except IntraFusionError:
                continue
            taken.append((g, s))
        rungs.append(taken)
    return rungs


def measure_rungs(base: Pruner, prune, loss: HeldOutLoss, rungs: list[tuple[int, float]]) -> list[float]:
    """The loss increase (loss − unpruned loss) of each rung (group, sparsity): a copy of `base`
    with the group pruned alone by prune(variant, {group: sparsity}) (the method, with its
    repair). All are evaluated together, in one pass over the held-out images, and each group's
    channel distances are measured once (Pruner.keeping_distances)."""
    variants = []
    with base.keeping_distances():
        for g, s in rungs:
            variant = base.copy()
            prune(variant, {g: s})
            variants.append(loss.hold(variant))
    return [value - loss.unpruned for value in loss.losses(variants)]


def measure_profile(base: Pruner, prune, loss: HeldOutLoss, groups, ladder=LADDER, known: Profile | None = None,
                    record=None, pool=None) -> Profile:
    """{group: [(s, loss(s) − loss(unpruned))]}, ladder order: each group pruned alone at each
    ladder sparsity it can take (profile_rungs), a group's rungs measured together
    (measure_rungs).

    known: points measured before (an interrupted run's), not measured again; record(profile):
    called with the points known so far (`known` and the new ones) after each group is measured,
    so that the cache keeps them; pool: an open experiments.parallel pool whose workers measure
    the groups' rungs (each with its own copy of the network, method and held-out images; its
    results(chunks) yields each chunk of rungs with their increases as they finish), None: here."""
    groups = list(groups)
    measured = {g: dict(points) for g, points in (known or {}).items()}
    rungs = profile_rungs(base, groups, ladder)
    pending = [[(g, s) for g, s in line if s not in measured.get(g, {})] for line in rungs]
    # Earliest groups first (the highest paper index: the most layers after them to refit and
    # evaluate), so that a pool's workers do not end waiting on one long group dealt out last.
    pending = sorted((line for line in pending if line), key=lambda line: -line[0][0])
    results = (pool.results(pending) if pool is not None else
               ((line, measure_rungs(base, prune, loss, line), None) for line in pending))
    for line, values, _ in results:
        for (g, s), value in zip(line, values):
            measured.setdefault(g, {})[s] = value
        if record is not None:
            record({g: list(points.items()) for g, points in measured.items()})
    return {g: [(s, measured[g][s]) for _, s in line] for g, line in zip(groups, rungs)}


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


def _entry(path: Path | str | None, key: str) -> dict | None:
    """The cache entry of `key` in the JSON file `path` (a profile, or the part of one an
    interrupted run measured), or None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        entry = json.loads(Path(path).read_text()).get(key)
        return entry if entry and isinstance(entry.get("profile"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def _points(entry: dict) -> Profile:
    return {int(g): [tuple(p) for p in pts] for g, pts in entry["profile"].items()}


def read_profile(path: Path | str | None, key: str) -> Profile | None:
    """The cached profile of `key` in the JSON file `path`, or None (also for the points of an
    interrupted measurement: read_partial)."""
    entry = _entry(path, key)
    return _points(entry) if entry is not None and entry.get("complete", True) else None


def read_partial(path: Path | str | None, key: str) -> tuple[Profile, float, float]:
    """(points, wall seconds, CPU seconds) that an interrupted measurement of `key` left in the
    cache `path`; ({}, 0, 0) when there are none."""
    entry = _entry(path, key)
    if entry is None or entry.get("complete", True):
        return {}, 0.0, 0.0
    return _points(entry), entry.get("seconds", 0.0), entry.get("cpu_seconds", 0.0)


def write_profile(path: Path | str | None, key: str, settings: dict, profile: Profile, seconds: float,
                  cpu_seconds: float = 0.0, complete: bool = True) -> None:
    """Add (or replace) the profile of `key` in the JSON cache `path`, atomically; with
    `complete` False, the points measured so far, which read_partial gives back."""
    if path is None:
        return
    path = Path(path)
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    cache[key] = {"settings": settings, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                  "profile": {str(g): [list(p) for p in pts] for g, pts in profile.items()},
                  **({} if complete else {"complete": False})}
    atomic_write(path, json.dumps(cache, indent=1, default=str).encode(), "rerun to measure it again")


def cached_profile(cache: Path | str | None, settings: dict, measure) -> tuple[Profile, float, float]:
    """(profile, wall seconds, CPU seconds spent measuring): from the cache when it holds
    `settings` (0, 0), else measure(known, record) (measure_profile's arguments: the points an
    interrupted run left in the cache, and a function storing the points known so far) and
    stored. The seconds include the interrupted runs'. CPU seconds (all threads of this
    process) are what a shared machine cannot inflate by making the process wait."""
    key = profile_key(settings)
    profile = read_profile(cache, key)
    if profile is not None:
        return profile, 0.0, 0.0
    known, before, cpu_before = read_partial(cache, key)
    start, cpu = time.perf_counter(), time.process_time()

    def spent() -> tuple[float, float]:
        return before + time.perf_counter() - start, cpu_before + time.process_time() - cpu

    def record(points: Profile) -> None:
        write_profile(cache, key, settings, points, *spent(), complete=False)

    profile = measure(known, record)
    seconds, cpu = spent()
    write_profile(cache, key, settings, profile, seconds, cpu)
    return profile, seconds, cpu
