"""Fast vs naive experiment grid: wall time, ratio, ideal ratio from MACs, accuracy equality.

    python bench/grid_speed.py [--models vgg11_bn resnet18] [--criteria l1 taylor] [--limit N]

Fast path: the graph is traced once per model, every cell prunes a copy, Taylor gradients are
measured once, and evaluation starts from cached unpruned-prefix activations. Naive path: every
cell reloads, refolds and retraces the network, re-measures gradients and runs the whole network.
Both run in this process on the same data; the ideal ratio counts multiply-accumulates
(naive: every cell runs its whole network; fast: each distinct prefix once plus every suffix).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from intrafusion.checkpoints import default_checkpoint, ensure_unzipped, load_weights, read_checkpoint  # noqa: E402
from intrafusion.data import load_dataset  # noqa: E402
from intrafusion.experiment import calibration_batches  # noqa: E402
from intrafusion.importance import Scorer  # noqa: E402
from intrafusion.models import build_model  # noqa: E402
from intrafusion.prefix import GridEvaluator, first_changed_segment, model_segments  # noqa: E402
from intrafusion.pruning import Pruner  # noqa: E402


def segment_macs(model: nn.Module, segments, x: torch.Tensor) -> list[int]:
    """Conv/linear multiply-accumulates of each segment for one image x (1, 3, H, W)."""
    counts = [0]

    def hook(module, inputs, out):
        if isinstance(module, nn.Linear):
            counts[0] += module.in_features * module.out_features
        else:
            counts[0] += out[0].numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    per_segment = []
    with torch.inference_mode():
        for _, fn in segments:
            counts[0] = 0
            x = fn(model, x)
            per_segment.append(counts[0])
    for h in hooks:
        h.remove()
    return per_segment


def load_model(name: str, dataset: str, num_classes: int) -> nn.Module:
    model = build_model(name, num_classes)
    path = default_checkpoint(name, dataset)
    ensure_unzipped(path)
    if path.is_file():
        load_weights(model, read_checkpoint(path)["model_state_dict"], path)
    else:
        print(f"  ({path} not found: using an untrained {name})")
    return model.eval()


def run(model, images, labels, cells, criterion, batches, fast: bool):
    """Accuracies of every (group, sparsity, method) cell, and the MACs the path needed."""
    x1 = images[:1]
    accs, macs, prefixes = [], 0, set()
    if fast:
        base = Pruner(copy.deepcopy(model), x1)
        scorer = Scorer(criterion, batches, cache=True)
        evaluator = GridEvaluator(base, images, labels, fast=True)
        segments = evaluator.segments
    else:
        scorer = Scorer(criterion, batches, cache=False)
    for group, sparsity, method in cells:
        if fast:
            variant = base.copy()
        else:
            variant = Pruner(copy.deepcopy(model), x1)
            evaluator = GridEvaluator(variant, images, labels, fast=False)
        variant.prune([group], sparsity, method, scorer)
        accs.append(evaluator.accuracy(variant, [group]))
        if fast:
            start = first_changed_segment(base.model, variant.model, segments)
            if start not in prefixes:
                prefixes.add(start)
                macs += sum(segment_macs(base.model, segments, x1)[:start])
            macs += sum(segment_macs(variant.model, segments, x1)[start:])
        else:
            segs = model_segments(variant.model)
            macs += sum(segment_macs(variant.model, segs, x1))
    return accs, macs * len(labels), evaluator.stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg11_bn", "resnet18"])
    p.add_argument("--criteria", nargs="+", default=["l1", "taylor"])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--group_idxs", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    args = p.parse_args()
    dataset = load_dataset(args.dataset, args.data_dir)
    images, labels = dataset.test_tensors(args.limit)
    batches = calibration_batches(dataset, 5, 128)
    cells = [(g, s, m) for g in args.group_idxs for s in args.sparsities
             for m in ("default", "intra_fusion")]
    print(f"{len(cells)} cells per grid, {len(labels)} test images, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'model':10s} {'crit':7s} {'naive s':>9s} {'fast s':>8s} {'ratio':>6s} {'ideal':>6s} {'% ideal':>8s}  equal"
    rows = []
    for name in args.models:
        model = load_model(name, args.dataset, dataset.num_classes)
        for criterion in args.criteria:
            t = time.perf_counter()
            fast_accs, fast_macs, stats = run(model, images, labels, cells, criterion, batches, True)
            fast_s = time.perf_counter() - t
            t = time.perf_counter()
            naive_accs, naive_macs, _ = run(model, images, labels, cells, criterion, batches, False)
            naive_s = time.perf_counter() - t
            ratio, ideal = naive_s / fast_s, naive_macs / fast_macs
            row = (f"{name:10s} {criterion:7s} {naive_s:9.1f} {fast_s:8.1f} {ratio:6.2f} {ideal:6.2f} "
                   f"{100 * ratio / ideal:7.0f}%  {fast_accs == naive_accs}")
            rows.append(row)
            print(row, f"(fast path: {stats})", flush=True)
    print("\n" + header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
