"""Least-squares reconstruction against statistics repair, through the library's `compress`.

    nice -n 5 python bench/reconstruct.py [--models vgg11_bn resnet18] [--macs 0.5 0.25 0.1]
        [--methods intra_fusion_repair default_reconstruct intra_fusion_reconstruct]
    nice -n 5 python bench/reconstruct.py --tune [--ridges 1e-4 1e-3 1e-2 1e-1] [--positions 60000]

Table (default): each shipped Fashion-MNIST checkpoint compressed by
`intrafusion.compress(model, x, macs=m, allocation="uniform", method=..., criterion="l1",
calibration=...)`, calibration the 10 unlabeled training batches of 128 of `intrafusion compress`
(grid.calibration_batches, seed 1), no fine-tuning; accuracy on the whole test set, MACs kept
(torch-pruning's counter), wall seconds of the compress call (rough: the cores are shared).

--tune: the ridge λ/mean-diagonal ratio and the sampled positions per layer, chosen on 5,000
held-out *training* images (grid.held_out_indices, disjoint from the calibration batches), never
the test set: each setting reconstructs the same pruned networks (default_reconstruct, uniform,
every --macs) and prints the held-out accuracy.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import intrafusion  # noqa: E402
from intrafusion.api import budget_plan, make_scorer, prune_plan  # noqa: E402
from intrafusion.evaluation import accuracy  # noqa: E402
from intrafusion.experiments.allocator import release_large_buffers  # noqa: E402
from intrafusion.experiments.checkpoints import model_from_state  # noqa: E402
from intrafusion.experiments.data import load_dataset  # noqa: E402
from intrafusion.experiments.grid import (GridConfig, calibration_batches, calibration_indices,  # noqa: E402
                                          held_out_indices, open_checkpoint)
from intrafusion.groups import FusionSettings, Pruner, count_macs_params  # noqa: E402
from intrafusion.methods import get_method  # noqa: E402
from intrafusion.reconstruct import reconstruct_pruned  # noqa: E402

EVAL_BATCH = 250  # batches of 1000 spend more system time zeroing pages (shared/facts/cpu-time.md)


def load(name: str, dataset):
    grid = GridConfig(model_name=name, dataset="fashion-mnist")
    state, _ = open_checkpoint(grid)
    return model_from_state(name, dataset.num_classes, state["model_state_dict"], grid.checkpoint_path()).eval()


def table(args, dataset, calibration) -> None:
    test_x, test_y = dataset.test_tensors()
    print("| model | MACs budget | method | MACs kept | accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        model = load(name, dataset)
        base_macs = count_macs_params(model, test_x[:1])[0]
        print(f"| {name} | 1 | none | 100.0% | {100 * accuracy(model, test_x, test_y, EVAL_BATCH):.2f}% | |",
              flush=True)
        for macs in args.macs:
            for method in args.methods:
                start = time.perf_counter()
                small = intrafusion.compress(model, test_x[:1], macs=macs, allocation="uniform", method=method,
                                             criterion="l1", calibration=calibration)
                seconds = time.perf_counter() - start
                kept = count_macs_params(small, test_x[:1])[0] / base_macs
                print(f"| {name} | {macs} | {method} | {100 * kept:.1f}% | "
                      f"{100 * accuracy(small, test_x, test_y, EVAL_BATCH):.2f}% | {seconds:.0f} |", flush=True)


def tune(args, dataset, calibration) -> None:
    n = len(dataset.train_labels)
    used = calibration_indices(n, 10, 128, seed=1)
    index = held_out_indices(n, 5000, used)
    held_x, held_y = dataset.normalize(dataset.train_images[index]), dataset.train_labels[index]
    method = get_method("default_reconstruct")
    print("| model | MACs budget | ridge | positions | held-out accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        base = Pruner(load(name, dataset), held_x[:1])
        scorer = make_scorer("l1", [])
        for macs in args.macs:
            plan = budget_plan(base, held_x[:1], None, ("macs", macs), "uniform", method, "l1", scorer,
                               FusionSettings(), calibration)
            pruned = base.copy()
            prune_plan(pruned, plan, method, scorer, FusionSettings())
            for positions in args.positions:
                for ridge in args.ridges:
                    variant = pruned.copy()
                    start = time.perf_counter()
                    reconstruct_pruned(base, variant, calibration, alpha=ridge, positions=positions)
                    seconds = time.perf_counter() - start
                    acc = accuracy(variant.model, held_x, held_y, EVAL_BATCH)
                    print(f"| {name} | {macs} | {ridge:g} | {positions} | {100 * acc:.2f}% | {seconds:.0f} |",
                          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vgg11_bn", "resnet18"])
    p.add_argument("--macs", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    p.add_argument("--methods", nargs="+",
                   default=["intra_fusion_repair", "default_reconstruct", "intra_fusion_reconstruct"])
    p.add_argument("--tune", action="store_true", help="choose ridge and positions on held-out training images")
    p.add_argument("--ridges", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--positions", nargs="+", type=int, default=[60_000])
    p.add_argument("--data-dir", default="data")
    args = p.parse_args()
    release_large_buffers()
    dataset = load_dataset("fashion-mnist", args.data_dir)
    calibration = [x for x, _ in calibration_batches(dataset, 10, 128, seed=1)]
    (tune if args.tune else table)(args, dataset, calibration)


if __name__ == "__main__":
    main()
