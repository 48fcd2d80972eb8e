"""Command-line entry points: thin wrappers that parse flags and call the library."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .errors import IntraFusionError


def resolve_device(gpu_id: int) -> torch.device:
    """CPU for -1, else cuda:<gpu_id>; a IntraFusionError when that GPU does not exist."""
    if gpu_id < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available() or gpu_id >= torch.cuda.device_count():
        raise IntraFusionError(f"--gpu_id {gpu_id} given but no such CUDA GPU is available; "
                        "use --gpu_id -1 for the CPU")
    return torch.device(f"cuda:{gpu_id}")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are UserErrors: one line, exit code 2."""

    def error(self, message):
        raise IntraFusionError(f"{message} (see {self.prog} --help)")


def _run(entry, argv) -> int:
    try:
        return entry(argv)
    except IntraFusionError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is saved, rerun the same command to resume",
              file=sys.stderr)
        return 130


def train_parser() -> argparse.ArgumentParser:
    from .experiments.data import DATASET_NAMES
    from .models import MODEL_NAMES
    p = _Parser(prog="train.py", description="Train a CIFAR-style model from scratch.")
    p.add_argument("--model-name", default="vgg11_bn", choices=MODEL_NAMES)
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASET_NAMES)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu_id", type=int, default=-1)
    p.add_argument("--out", default=None,
                   help="checkpoint path (default models/<dataset>/<model>.checkpoint, "
                        "models/<model>.checkpoint for cifar10)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _train(argv) -> int:
    import math

    from .experiments.checkpoints import default_checkpoint
    from .experiments.data import load_dataset
    from .experiments.training import TrainSettings, new_model, train
    args = train_parser().parse_args(argv)
    device = resolve_device(args.gpu_id)
    if args.epochs < 1 or args.batch_size < 1 or not (math.isfinite(args.lr) and args.lr > 0):
        raise IntraFusionError("--epochs, --batch-size and --lr must be positive")
    if not 0 < args.momentum < 1 or not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise IntraFusionError("--momentum must lie in (0, 1) (Nesterov SGD) and --weight-decay be >= 0")
    dataset = load_dataset(args.dataset, args.data_dir)
    out = Path(args.out) if args.out else default_checkpoint(args.model_name, args.dataset)
    settings = TrainSettings(args.model_name, args.dataset, args.epochs, args.batch_size, args.lr,
                             args.momentum, args.weight_decay, not args.no_augment, args.seed)
    result = train(new_model(settings, dataset.num_classes), dataset, settings, out, device,
                   quiet=args.quiet or not sys.stderr.isatty())
    print(f"saved {out}: test accuracy {result['test_accuracy']:.2f}%")
    return 0


def train_main(argv=None) -> int:
    return _run(_train, argv)


def group_index(value: str):
    """A --group_idxs value: an int, or 'all'."""
    return "all" if value == "all" else int(value)


def main_parser() -> argparse.ArgumentParser:
    from .experiments.data import DATASET_NAMES
    from .fusion import FUSION_RULES
    from .importance import CRITERIA
    from .methods import METHOD_NAMES
    from .transport import MARGINALS, TARGETS
    p = _Parser(
        prog="main.py",
        description="Compare default pruning with Intra-Fusion per group and sparsity.")
    p.add_argument("--model-name", default="vgg11_bn", help="model architecture (e.g. vgg11_bn, resnet18)")
    p.add_argument("--group_idxs", type=group_index, nargs="*", default=[1, 2, 3],
                   help="groups to prune, each on its own, counted from the output (0 = last "
                        "prunable group); 'all' prunes every group together")
    p.add_argument("--sparsities", type=float, nargs="*", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--importance_criteria", nargs="+", default=["l1"], metavar="CRITERION",
                   help=f"one or more of {', '.join(CRITERIA)}")
    p.add_argument("--source_prob", default="uniform", help=f"source marginal: {', '.join(MARGINALS)}")
    p.add_argument("--target_prob", default="uniform", help=f"target marginal: {', '.join(MARGINALS)}")
    p.add_argument("--p", type=float, default=1.0, help="p of the p-norm ground cost")
    p.add_argument("--target", default="most_important", help=f"OT targets: {', '.join(TARGETS)}")
    p.add_argument("--gpu_id", type=int, default=-1, help="CUDA device index, -1 for the CPU")
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--checkpoint", default=None,
                   help="default models/<model>.checkpoint (cifar10), models/<dataset>/<model>.checkpoint")
    p.add_argument("--fusion-rule", default="fork", help=f"one of {', '.join(FUSION_RULES)}")
    p.add_argument("--methods", nargs="+", default=["default", "intra_fusion"],
                   help=f"any of {', '.join(METHOD_NAMES)}")
    p.add_argument("--out", default=None, help="CSV path (default results/<model>_<dataset>_<criterion>.csv)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="skip cells already in the CSV (default: on when it exists with this "
                        "version's columns); --no-resume refuses a CSV that holds rows")
    p.add_argument("--overwrite", action="store_true",
                   help="start the CSV over, even when its rows were computed with other settings")
    p.add_argument("--plot", action="store_true", help="draw the CSV into a PNG beside it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--repair-batches", type=int, default=10,
                   help="unlabeled training batches (of 128) for the *_repair methods")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune every pruned network this many epochs ('+ft' rows per epoch)")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--naive", action="store_true",
                   help="turn every shortcut off: retrace per cell, no cached gradients or "
                        "prefix activations (for benchmarks; same results)")
    p.add_argument("--cache-mb", type=float, default=2048,
                   help="memory budget of cached prefix activations (MiB)")
    return p


def _main(argv) -> int:
    from .experiments.grid import GridConfig, run_grid
    from .groups import FusionSettings
    args = main_parser().parse_args(argv)
    device = resolve_device(args.gpu_id)
    config = GridConfig(
        model_name=args.model_name, dataset=args.dataset, data_dir=args.data_dir,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        group_idxs=tuple(args.group_idxs), sparsities=tuple(args.sparsities),
        criteria=tuple(args.importance_criteria), methods=tuple(args.methods),
        fusion=FusionSettings(args.target, args.source_prob, args.target_prob, args.p, args.fusion_rule),
        device=str(device), out=Path(args.out) if args.out else None, resume=args.resume,
        overwrite=args.overwrite, fast=not args.naive, cache_mb=args.cache_mb,
        repair_batches=args.repair_batches, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr)
    results = run_grid(config, progress=not args.quiet and sys.stderr.isatty())
    if args.plot:
        from .experiments.plotting import plot_all
        for path in results:
            for png in plot_all(path):
                print(f"wrote {png}")
    return 0


def main(argv=None) -> int:
    return _run(_main, argv)


def package_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m intrafusion", description="Tools for Intra-Fusion result files.")
    commands = p.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="draw a results CSV into a PNG",
                               description="Accuracy against sparsity per group and method.")
    plot.add_argument("csv", help="a CSV written by main.py")
    plot.add_argument("--out", default=None, help="PNG path (default: the CSV's path with .png)")
    return p


def _package(argv) -> int:
    from .experiments.plotting import plot_all
    args = package_parser().parse_args(argv)
    for png in plot_all(args.csv, args.out):
        print(f"wrote {png}")
    return 0


def package_main(argv=None) -> int:
    """`python -m intrafusion plot results/x.csv`."""
    return _run(_package, argv)
