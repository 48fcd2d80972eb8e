"""Least-squares reconstruction against statistics repair, through the library's `compress`.

    nice -n 5 python bench/reconstruct.py [--models vgg11_bn resnet18] [--macs 0.5 0.25 0.1]
        [--methods intra_fusion_repair default_reconstruct intra_fusion_reconstruct]
        [--allocations uniform sensitivity] [--record results/reconstruct.json] [--plot F.png]
    nice -n 5 python bench/reconstruct.py --tune [--ridges 1e-4 1e-3 1e-2 1e-1] [--positions 60000]

Table (default): each shipped Fashion-MNIST checkpoint compressed by
`intrafusion.compress(model, x, macs=m, allocation=a, method=..., criterion="l1",
calibration=..., held_out=...)`, calibration the 10 unlabeled training batches of 128 of
`intrafusion compress` (grid.calibration_batches, seed 1), the sensitivity profile measured on its
1,000 held-out training images (compress.held_out_set) and shared by the budgets of a method
through a profile cache next to the record; no fine-tuning; accuracy on the whole test set, MACs
kept (torch-pruning's counter), wall seconds of the compress call (rough: the cores are shared).
Each row is kept in the --record JSON as it is measured, so the same command, run again, measures
only what is missing; --plot draws the record as accuracy against MACs kept.

--tune: the ridge λ/mean-diagonal ratio and the sampled positions per layer, chosen on 5,000
held-out *training* images (grid.held_out_indices, disjoint from the calibration batches), never
the test set: each setting reconstructs the same pruned networks (default_reconstruct, uniform,
every --macs) and prints the held-out accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import intrafusion  # noqa: E402
from intrafusion.api import budget_plan, make_scorer, prune_plan  # noqa: E402
from intrafusion.evaluation import accuracy  # noqa: E402
from intrafusion.experiments.allocator import release_large_buffers  # noqa: E402
from intrafusion.experiments.checkpoints import model_from_state  # noqa: E402
from intrafusion.experiments.compress import CompressConfig, held_out_set  # noqa: E402
from intrafusion.experiments.data import load_dataset  # noqa: E402
from intrafusion.experiments.grid import (GridConfig, calibration_batches, calibration_indices,  # noqa: E402
                                          held_out_indices, open_checkpoint)
from intrafusion.groups import FusionSettings, Pruner, count_macs_params  # noqa: E402
from intrafusion.methods import get_method  # noqa: E402
from intrafusion.reconstruct import reconstruct_pruned  # noqa: E402
from intrafusion.storage import atomic_write  # noqa: E402

EVAL_BATCH = 250  # batches of 1000 spend more system time zeroing pages (shared/facts/cpu-time.md)


def load(name: str, dataset):
    grid = GridConfig(model_name=name, dataset="fashion-mnist")
    state, _ = open_checkpoint(grid)
    return model_from_state(name, dataset.num_classes, state["model_state_dict"], grid.checkpoint_path()).eval()


def row_key(row: dict) -> tuple:
    return row["model"], row["macs_budget"], row["allocation"], row["method"]


def read_record(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def keep(path: Path, rows: list[dict]) -> None:
    atomic_write(path, json.dumps(rows, indent=1).encode(), "free disk space and run the same command again")


def compressed_row(model, base_macs, test_x, test_y, macs, allocation, method, calibration, held_out,
                   cache: Path) -> dict:
    """macs_kept, accuracy and seconds of one `intrafusion.compress` call."""
    start = time.perf_counter()
    small = intrafusion.compress(model, test_x[:1], macs=macs, allocation=allocation, method=method,
                                 criterion="l1", calibration=calibration, held_out=held_out, profile_cache=cache)
    seconds = time.perf_counter() - start
    return {"macs_kept": count_macs_params(small, test_x[:1])[0] / base_macs,
            "accuracy": accuracy(small, test_x, test_y, EVAL_BATCH), "seconds": seconds}


def table(args, dataset, calibration) -> None:
    test_x, test_y = dataset.test_tensors()
    measured = {row_key(row): row for row in read_record(args.record)}
    print("| model | MACs budget | allocation | method | MACs kept | accuracy | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = load(name, dataset)
        base_macs = count_macs_params(model, test_x[:1])[0]
        held_out = held_out_set(dataset, CompressConfig(model_name=name, dataset="fashion-mnist", out=Path()))
        cells = [(1, "", "none")] + [(m, a, method) for a in args.allocations for method in args.methods
                                     for m in args.macs]
        for macs, allocation, method in cells:
            key = (name, macs, allocation, method)
            if key not in measured:
                measured[key] = dict(zip(("model", "macs_budget", "allocation", "method"), key), **(
                    {"macs_kept": 1.0, "accuracy": accuracy(model, test_x, test_y, EVAL_BATCH), "seconds": 0.0}
                    if method == "none" else
                    compressed_row(model, base_macs, test_x, test_y, macs, allocation, method, calibration,
                                   held_out, args.record.with_suffix(".profiles.json"))))
                keep(args.record, list(measured.values()))
            row = measured[key]
            print(f"| {name} | {macs} | {allocation} | {method} | {100 * row['macs_kept']:.1f}% | "
                  f"{100 * row['accuracy']:.2f}% | {row['seconds']:.0f} |", flush=True)


def plot(record: Path, out: Path) -> None:
    """Accuracy against MACs kept, a column per model (the lower panel zoomed to within 3 pt of
    the unpruned accuracy): a colour per method, solid for the uniform allocation, dashed for
    sensitivity; the unpruned accuracy as a grey line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_record(record)
    unpruned = {r["model"]: 100 * r["accuracy"] for r in rows if r["method"] == "none"}
    rows = [r for r in rows if r["method"] != "none"]
    models = sorted({r["model"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for column, name in enumerate(models):
        for row, ax in enumerate(axes[:, column]):
            for method in methods:
                for allocation, style in (("uniform", "-"), ("sensitivity", "--")):
                    points = sorted((r["macs_kept"], r["accuracy"]) for r in rows
                                    if (r["model"], r["method"], r["allocation"]) == (name, method, allocation))
                    if points:
                        ax.plot([100 * m for m, _ in points], [100 * a for _, a in points], marker="o",
                                linestyle=style, color=colours[method], label=f"{method}, {allocation}")
            if name in unpruned:
                ax.axhline(unpruned[name], color="grey", linewidth=0.8, label="unpruned")
                if row == 1:
                    ax.set_ylim(unpruned[name] - 3, unpruned[name] + 0.5)
            ax.set(title=f"{name}, Fashion-MNIST test set" + (" (zoomed)" if row else ""),
                   xlabel="MACs kept (%)", ylabel="accuracy (%)", xscale="log", xlim=(8, 60))
            ax.minorticks_off()
            ax.set_xticks([10, 25, 50], ["10", "25", "50"])
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


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
    p.add_argument("--allocations", nargs="+", default=["uniform"], choices=["uniform", "sensitivity"])
    p.add_argument("--record", type=Path, default=Path("results/reconstruct.json"),
                   help="rows measured so far (kept as they come; measured rows are not measured again)")
    p.add_argument("--plot", type=Path, help="draw the record as accuracy against MACs kept to this file and stop")
    p.add_argument("--tune", action="store_true", help="choose ridge and positions on held-out training images")
    p.add_argument("--ridges", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--positions", nargs="+", type=int, default=[60_000])
    p.add_argument("--data-dir", default="data")
    args = p.parse_args()
    if args.plot:
        return plot(args.record, args.plot)
    release_large_buffers()
    dataset = load_dataset("fashion-mnist", args.data_dir)
    calibration = [x for x, _ in calibration_batches(dataset, 10, 128, seed=1)]
    (tune if args.tune else table)(args, dataset, calibration)


if __name__ == "__main__":
    main()
