"""Fast vs naive experiment grid: wall time, ratio, ideal ratio from MACs, accuracy equality.

    python bench/grid_speed.py [--models vgg11_bn resnet18] [--criteria l1 taylor] [--limit N]
                               [--paths fast naive] [--record results/grid_speed.json] [--fresh]

Fast path: the graph is traced once per model, every cell prunes a copy, Taylor gradients are
measured once, and evaluation starts from cached unpruned-prefix activations. Naive path: every
cell reloads, refolds and retraces the network, re-measures gradients and runs the whole network.
Both run in this process on the same data; the ideal ratio counts multiply-accumulates
(naive: every cell runs its whole network; fast: each unpruned segment that some prefix needs
once, as the prefixes are nested and computed in one pass, plus every pruned suffix).

A full run takes hours on a CPU, so each finished path (model, criterion, fast or naive) is
written to `--record` at once and skipped when the same command is run again; the table is
printed from the record. Run it on an otherwise idle machine: the two paths of a row may then
come from different processes.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from intrafusion.experiments.checkpoints import default_checkpoint, ensure_unzipped, model_from_state, read_checkpoint  # noqa: E402
from intrafusion.experiments.data import load_dataset  # noqa: E402
from intrafusion.experiments.grid import calibration_batches  # noqa: E402
from intrafusion.importance import Scorer  # noqa: E402
from intrafusion.models import build_model  # noqa: E402
from intrafusion.experiments.prefix import GridEvaluator, first_changed_segment, model_segments  # noqa: E402
from intrafusion.groups import Pruner  # noqa: E402
from intrafusion.storage import atomic_write, file_digest  # noqa: E402


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


def load_model(name: str, dataset: str, num_classes: int) -> tuple[nn.Module, str]:
    """The model with its shipped weights, and the checkpoint's digest ("untrained" if none)."""
    path = default_checkpoint(name, dataset)
    ensure_unzipped(path)
    if not path.is_file():
        print(f"  ({path} not found: using an untrained {name})")
        return build_model(name, num_classes).eval(), "untrained"
    model = model_from_state(name, num_classes, read_checkpoint(path)["model_state_dict"], path)
    return model.eval(), file_digest(path)[:12]


def run(model, images, labels, cells, criterion, batches, fast: bool):
    """Accuracies of every (group, sparsity, method) cell, and the MACs the path needed."""
    x1 = images[:1]
    accs, macs, prefix_end = [], 0, 0
    if fast:
        base = Pruner(copy.deepcopy(model), x1)
        scorer = Scorer(criterion, batches, cache=True)
        evaluator = GridEvaluator(base, images, labels, fast=True)
        evaluator.plan({g for g, _, _ in cells})
        segments = evaluator.segments
        base_macs = segment_macs(base.model, segments, x1)
    else:
        scorer = Scorer(criterion, batches, cache=False)
    for group, sparsity, method in cells:
        if fast:
            variant = base.copy()
        else:
            variant = Pruner(copy.deepcopy(model), x1)
            evaluator = GridEvaluator(variant, images, labels, fast=False)
        variant.prune([group], sparsity, method, scorer)
        accs.append(evaluator.accuracy(variant))
        if fast:
            start = first_changed_segment(base.model, variant.model, segments)
            macs += sum(base_macs[prefix_end:start])
            prefix_end = max(prefix_end, start)
            macs += sum(segment_macs(variant.model, segments, x1)[start:])
        else:
            segs = model_segments(variant.model)
            macs += sum(segment_macs(variant.model, segs, x1))
    return accs, macs * len(labels), evaluator.stats


def read_record(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg11_bn", "resnet18"])
    p.add_argument("--criteria", nargs="+", default=["l1", "taylor"])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--group_idxs", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--paths", nargs="+", choices=["fast", "naive"], default=["fast", "naive"],
                   help="time only these paths (a row is printed once both are recorded)")
    p.add_argument("--record", type=Path, default=Path("results/grid_speed.json"),
                   help="finished paths are kept here and not run again")
    p.add_argument("--fresh", action="store_true", help="ignore the record: time every path again")
    args = p.parse_args()
    record = {} if args.fresh else read_record(args.record)
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
        model, weights = load_model(name, args.dataset, dataset.num_classes)
        for criterion in args.criteria:
            timed = {}
            for path in ("fast", "naive"):
                key = "/".join(map(str, (name, weights, criterion, path, len(labels), torch.get_num_threads(),
                                         args.group_idxs, args.sparsities)))
                if key not in record and path in args.paths:
                    t = time.perf_counter()
                    accs, macs, stats = run(model, images, labels, cells, criterion, batches,
                                            path == "fast")
                    record[key] = {"seconds": time.perf_counter() - t, "accuracies": accs,
                                   "macs": macs, "stats": stats, "finished": time.ctime()}
                    atomic_write(args.record, json.dumps(record, indent=1).encode(), "rerun to resume")
                if key in record:
                    timed[path] = record[key]
            if len(timed) < 2:
                print(f"{name:10s} {criterion:7s} recorded: {', '.join(timed) or 'nothing'}", flush=True)
                continue
            fast, naive = timed["fast"], timed["naive"]
            ratio, ideal = naive["seconds"] / fast["seconds"], naive["macs"] / fast["macs"]
            row = (f"{name:10s} {criterion:7s} {naive['seconds']:9.1f} {fast['seconds']:8.1f} "
                   f"{ratio:6.2f} {ideal:6.2f} {100 * ratio / ideal:7.0f}%  "
                   f"{fast['accuracies'] == naive['accuracies']}")
            rows.append(row)
            print(row, f"(fast path: {fast['stats']})", flush=True)
    print("\n" + header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
