"""Fast vs naive experiment grid: wall and CPU time, peak memory, ideal ratio from MACs, and how
many test images the two paths predict differently.

    python bench/grid_speed.py [--models vgg11_bn resnet18] [--criteria l1 taylor] [--limit N]
                               [--threads N] [--paths fast naive] [--record results/grid_speed.json]
                               [--fresh]

Fast path (as `GridRun.compute` does it for a chunk): the graph is traced once per model, every
cell prunes a copy that shares its unchanged tensors with the base, Taylor gradients are measured
once, and all cells are evaluated together in one data-major pass (evaluator.py), which
also gives the unpruned accuracy. Naive path, timed as for the README's table: every cell reloads,
refolds and retraces the network, re-measures gradients and runs the whole network on the test
set; the unpruned accuracy, which main.py's naive path measures with a pass of its own, is left
out of its time (so the ratios are up to one cell's share below main.py's). Each path runs in a
process of its own, so that its peak resident memory (ru_maxrss) is its own.

The ideal ratio counts conv/linear multiply-accumulates: naive, every cell's whole network; fast,
the unpruned network once (to its end: its accuracy) plus every variant from its first changed
segment on, its first changed layer counted as what reusing it costs (k·n per output position for
a mix, none for an exact channel slice) instead of its convolution.

A full run takes hours on a CPU, so each finished path (model, criterion, fast or naive) is written
to `--record` at once and skipped when the same command is run again; the table is printed from
the record. On a shared machine, compare CPU seconds as well as wall seconds.
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from intrafusion.experiments.allocator import release_large_buffers  # noqa: E402
from intrafusion.experiments.checkpoints import default_checkpoint, ensure_unzipped, model_from_state, read_checkpoint  # noqa: E402
from intrafusion.experiments.data import load_dataset  # noqa: E402
from intrafusion.experiments.grid import calibration_batches  # noqa: E402
from intrafusion.evaluator import GridEvaluator, model_segments, share_unchanged  # noqa: E402
from intrafusion.groups import Pruner  # noqa: E402
from intrafusion.importance import Scorer  # noqa: E402
from intrafusion.models import build_model  # noqa: E402
from intrafusion.storage import atomic_write, file_digest  # noqa: E402


def segment_macs(model: nn.Module, segments, x: torch.Tensor, start: int = 0, reuse=None) -> int:
    """Conv/linear multiply-accumulates of segments[start:] for x, the activation (1, …) entering
    segment `start`; the layer `reuse` (a LayerMap) counted as its reuse costs."""
    total = [0]

    def hook(module, inputs, out):
        positions = out[0].numel() // out.shape[1] if isinstance(module, nn.Conv2d) else 1
        if reuse is not None and module is model.get_submodule(reuse.name):
            total[0] += reuse.macs(positions)
        elif isinstance(module, nn.Linear):
            total[0] += module.in_features * module.out_features
        else:
            total[0] += out[0].numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        for _, fn in segments[start:]:
            x = fn(model, x)
    for h in hooks:
        h.remove()
    return total[0]


def load_model(name: str, dataset: str, num_classes: int) -> tuple[nn.Module, str]:
    """The model with its shipped weights, and the checkpoint's digest ("untrained" if none)."""
    path = default_checkpoint(name, dataset)
    ensure_unzipped(path)
    if not path.is_file():
        print(f"  ({path} not found: using an untrained {name})", file=sys.stderr)
        return build_model(name, num_classes).eval(), "untrained"
    model = model_from_state(name, num_classes, read_checkpoint(path)["model_state_dict"], path)
    return model.eval(), file_digest(path)[:12]


def fast_path(model, images, labels, cells, criterion, batches):
    """(unpruned accuracy, predictions per cell, MACs per image, evaluator stats)."""
    x1 = images[:1]
    base = Pruner(copy.deepcopy(model), x1)
    scorer = Scorer(criterion, batches, cache=True)
    evaluator = GridEvaluator(base, images, labels)
    variants = []
    for group, sparsity, method in cells:
        variant = base.copy()
        variant.prune([group], sparsity, method, scorer)
        share_unchanged(base.model, variant.model)
        variants.append(variant)
    predictions = evaluator.evaluate(variants, "predictions")
    segments = evaluator.segments
    macs = segment_macs(base.model, segments, x1)
    with torch.inference_mode():
        entering = [x1]
        for _, fn in segments:
            entering.append(fn(base.model, entering[-1]))
    for variant in variants:
        route = evaluator.route(variant)
        macs += segment_macs(variant.model, segments, entering[route.start], route.start, route.reuse)
    return evaluator.base_accuracy, predictions, macs, evaluator.stats


def naive_path(model, images, labels, cells, criterion, batches):
    """(None: the unpruned accuracy is not part of this path, predictions per cell, MACs per
    image, evaluator stats)."""
    x1 = images[:1]
    macs, scorer = 0, Scorer(criterion, batches, cache=False)
    predictions, stats = [], {}
    for group, sparsity, method in cells:
        variant = Pruner(copy.deepcopy(model), x1)
        variant.prune([group], sparsity, method, scorer)
        evaluator = GridEvaluator(variant, images, labels, fast=False)
        predictions += evaluator.evaluate([variant], "predictions")
        macs += segment_macs(variant.model, model_segments(variant.model), x1)
        stats = {k: stats.get(k, 0) + v for k, v in evaluator.stats.items()}
    return None, predictions, macs, stats


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2 ** 20


def child(spec: dict) -> dict:
    """Run one path in this process; its timings, peak memory, accuracies and predictions."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    release_large_buffers()  # as the CLI does, for both paths
    dataset = load_dataset(spec["dataset"], spec["data_dir"])
    images, labels = dataset.test_tensors(spec["limit"])
    batches = calibration_batches(dataset, 5, 128)
    model, _ = load_model(spec["model"], spec["dataset"], dataset.num_classes)
    cells = [tuple(c) for c in spec["cells"]]
    before = rss_mib()
    wall, cpu = time.perf_counter(), time.process_time()
    path = fast_path if spec["path"] == "fast" else naive_path
    base_accuracy, predictions, macs, stats = path(model, images, labels, cells, spec["criterion"], batches)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if base_accuracy is None:  # for the comparison only
        base_accuracy = GridEvaluator(Pruner(model, images[:1]), images, labels, fast=False).base_accuracy
    return {"seconds": wall, "cpu_seconds": cpu, "peak_mib": peak, "rss_before_mib": before,
            "base_accuracy": base_accuracy,
            "accuracies": [float((p == labels).float().mean()) for p in predictions],
            "predictions": [base64.b64encode(p.to(torch.uint8).numpy().tobytes()).decode() for p in predictions],
            "macs": macs * len(labels), "stats": stats, "threads": torch.get_num_threads(),
            "finished": time.ctime()}


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{spec['path']} path of {spec['model']} {spec['criterion']} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def differing(a: dict, b: dict, cells, method: str) -> int:
    """Test images predicted differently by the two paths, summed over the cells of `method`."""
    count = 0
    for cell, pa, pb in zip(cells, a["predictions"], b["predictions"]):
        if cell[2] == method:
            count += sum(x != y for x, y in zip(base64.b64decode(pa), base64.b64decode(pb)))
    return count


def read_record(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg11_bn", "resnet18"])
    p.add_argument("--criteria", nargs="+", default=["l1", "taylor"])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--threads", type=int, default=0, help="torch threads per path (0: torch's default)")
    p.add_argument("--group_idxs", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--paths", nargs="+", choices=["fast", "naive"], default=["fast", "naive"],
                   help="time only these paths (a row is printed once both are recorded)")
    p.add_argument("--record", type=Path, default=Path("results/grid_speed.json"),
                   help="finished paths are kept here and not run again")
    p.add_argument("--fresh", action="store_true", help="ignore the record: time every path again")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    record = {} if args.fresh else read_record(args.record)
    cells = [(g, s, m) for g in args.group_idxs for s in args.sparsities for m in ("default", "intra_fusion")]
    print(f"{len(cells)} cells per grid, {args.limit or 'all'} test images, threads "
          f"{args.threads or 'default'}, torch {torch.__version__}")
    rows = []
    for name in args.models:
        for criterion in args.criteria:
            timed = {}
            for path in ("naive", "fast"):
                spec = dict(path=path, model=name, criterion=criterion, dataset=args.dataset,
                            data_dir=args.data_dir, limit=args.limit, threads=args.threads, cells=cells)
                key = "/".join(map(str, (name, criterion, path, args.limit, args.threads, args.group_idxs,
                                         args.sparsities)))
                if key not in record and path in args.paths:
                    record[key] = run_child(spec)
                    atomic_write(args.record, json.dumps(record, indent=1).encode(), "rerun to resume")
                if key in record:
                    timed[path] = record[key]
            if len(timed) < 2:
                print(f"{name:10s} {criterion:7s} recorded: {', '.join(timed) or 'nothing'}", flush=True)
                continue
            rows.append(table_row(name, criterion, timed["naive"], timed["fast"], cells))
            print(rows[-1], f"(fast path: {timed['fast']['stats']})", flush=True)
    print(f"\n{'model':10s} {'crit':7s} {'naive s':>9s} {'fast s':>8s} {'ratio':>6s} {'cpu naive':>9s} "
          f"{'cpu fast':>8s} {'ratio':>6s} {'ideal':>6s} {'% ideal':>7s} {'MiB naive':>9s} {'MiB fast':>8s} "
          f"{'×':>5s}  equal  images differing default/fused")
    print("\n".join(rows))


def table_row(name: str, criterion: str, naive: dict, fast: dict, cells) -> str:
    ratio, cpu = naive["seconds"] / fast["seconds"], naive["cpu_seconds"] / fast["cpu_seconds"]
    ideal = naive["macs"] / fast["macs"]
    equal = fast["accuracies"] == naive["accuracies"] and fast["base_accuracy"] == naive["base_accuracy"]
    return (f"{name:10s} {criterion:7s} {naive['seconds']:9.1f} {fast['seconds']:8.1f} {ratio:6.2f} "
            f"{naive['cpu_seconds']:9.1f} {fast['cpu_seconds']:8.1f} {cpu:6.2f} {ideal:6.2f} "
            f"{100 * ratio / ideal:6.0f}% {naive['peak_mib']:9.0f} {fast['peak_mib']:8.0f} "
            f"{fast['peak_mib'] / naive['peak_mib']:5.2f}  {'yes' if equal else 'no ':5s}  "
            f"{differing(naive, fast, cells, 'default')}/{differing(naive, fast, cells, 'intra_fusion')}")


if __name__ == "__main__":
    main()
