"""Command-line entry points: thin wrappers that parse flags and call the library.

`intrafusion <command> …` (or `python -m intrafusion <command> …`) runs one entry of COMMANDS;
`main.py` is `intrafusion grid` and `train.py` is `intrafusion train` under their old names. A
command is a function adding its flags to a parser and a function running the parsed flags, so a
new one is two functions and one line in COMMANDS."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import IntraFusionError
from .experiments.allocator import release_large_buffers


def resolve_device(gpu_id: int) -> torch.device:
    """CPU for -1, else cuda:<gpu_id>; a IntraFusionError when that GPU does not exist."""
    if gpu_id < -1:
        raise IntraFusionError(f"--gpu_id must be -1 (the CPU) or a CUDA device index, got {gpu_id}")
    if gpu_id == -1:
        return torch.device("cpu")
    if not torch.cuda.is_available() or gpu_id >= torch.cuda.device_count():
        raise IntraFusionError(f"--gpu_id {gpu_id} given but no such CUDA GPU is available; "
                        "use --gpu_id -1 for the CPU")
    return torch.device(f"cuda:{gpu_id}")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are IntraFusionErrors: one line, exit code 2."""

    def error(self, message):
        raise IntraFusionError(f"{message} (see {self.prog} --help)")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from .experiments.data import DATASET_NAMES
    from .experiments.training import OPTIMIZERS
    from .models import MODEL_NAMES
    model = p.add_argument_group("model")
    model.add_argument("--model-name", default="vgg11_bn", choices=MODEL_NAMES)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="fashion-mnist", choices=DATASET_NAMES)
    data.add_argument("--data-dir", default="data")
    data.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    data.add_argument("--held-out", type=int, default=0,
                      help="leave this many training images out and report accuracy on them "
                           "instead of the test set (to choose hyper-parameters)")
    training = p.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=5)
    training.add_argument("--batch-size", type=int, default=128)
    training.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                          help="sgd: Nesterov SGD, one-cycle schedule; adamw: AdamW, linear "
                               "warm-up then cosine decay to 0")
    training.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the schedule")
    training.add_argument("--warmup-epochs", type=float, default=0.0,
                          help="length of AdamW's linear warm-up in epochs (may be fractional)")
    training.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum, AdamW's beta1")
    training.add_argument("--weight-decay", type=float, default=5e-4,
                          help="AdamW: on linear and convolution weights only")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--gpu_id", type=int, default=-1, help="CUDA device index, -1 for the CPU")
    output = p.add_argument_group("output")
    output.add_argument("--out", default=None,
                        help="checkpoint path (default models/<dataset>/<model>.checkpoint, "
                             "models/<model>.checkpoint for cifar10)")
    output.add_argument("--quiet", action="store_true", help="no progress bar")


def _train(args: argparse.Namespace) -> int:
    from .experiments.checkpoints import default_checkpoint
    from .experiments.data import load_dataset
    from .experiments.training import TrainSettings, new_model, train
    device = resolve_device(args.gpu_id)
    settings = TrainSettings(args.model_name, args.dataset, args.epochs, args.batch_size, args.lr,
                             args.momentum, args.weight_decay, not args.no_augment, args.seed,
                             args.optimizer, args.warmup_epochs, args.held_out)
    dataset = load_dataset(args.dataset, args.data_dir)
    out = Path(args.out) if args.out else default_checkpoint(args.model_name, args.dataset)
    result = train(new_model(settings, dataset.num_classes), dataset, settings, out, device,
                   quiet=args.quiet or not sys.stderr.isatty())
    metric = "held_out_accuracy" if args.held_out else "test_accuracy"
    print(f"saved {out}: {metric.replace('_', ' ')} {result[metric]:.2f}%")
    return 0


def group_index(value: str):
    """A --group_idxs value: an int, or 'all'."""
    return "all" if value == "all" else int(value)


def _grid_arguments(p: argparse.ArgumentParser) -> None:
    from .experiments.data import DATASET_NAMES
    from .fusion import FUSION_RULES
    from .importance import CRITERIA
    from .methods import METHOD_NAMES
    from .transport import MARGINALS, TARGETS
    what = p.add_argument_group("what to prune")
    what.add_argument("--model-name", default="vgg11_bn",
                      help="model architecture (e.g. vgg11_bn, resnet18; llama_gqa: the language model)")
    what.add_argument("--checkpoint", default=None,
                      help="default models/<model>.checkpoint (cifar10), models/<dataset>/<model>.checkpoint; "
                           "a language model: the folder models/python-stdlib/<model>/")
    what.add_argument("--group_idxs", type=group_index, nargs="*", default=[1, 2, 3],
                      help="groups to prune, each on its own, counted from the output (0 = last "
                           "prunable group); 'all' prunes every group together")
    what.add_argument("--sparsities", type=float, nargs="*", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    _budget_arguments(p, many=True, allocation="uniform")
    method = p.add_argument_group("method")
    method.add_argument("--methods", nargs="+", default=["default", "intra_fusion"],
                        help=f"any of {', '.join(METHOD_NAMES)}")
    method.add_argument("--importance_criteria", nargs="+", default=["l1"], metavar="CRITERION",
                        help=f"one or more of {', '.join(CRITERIA)}")
    method.add_argument("--source_prob", default="uniform", help=f"source marginal: {', '.join(MARGINALS)}")
    method.add_argument("--target_prob", default="uniform", help=f"target marginal: {', '.join(MARGINALS)}")
    method.add_argument("--p", type=float, default=1.0, help="p of the p-norm ground cost")
    method.add_argument("--target", default="most_important", help=f"OT targets: {', '.join(TARGETS)}")
    method.add_argument("--fusion-rule", default="fork", help=f"one of {', '.join(FUSION_RULES)}")
    method.add_argument("--finetune-epochs", type=int, default=0,
                        help="fine-tune every pruned network this many epochs ('+ft' rows per epoch)")
    method.add_argument("--finetune-lr", type=float, default=0.01)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10",
                      help=f"one of {', '.join(DATASET_NAMES)}; python-stdlib for a language model")
    data.add_argument("--data-dir", default="data")
    data.add_argument("--corpus-root", default=None,
                      help="python-stdlib: the folder of .py files (default this Python's standard library)")
    data.add_argument("--repair-batches", type=int, default=10,
                      help="unlabeled training batches (of 128; a language model: of 4 windows) for the "
                           "*_repair and *_reconstruct methods")
    output = p.add_argument_group("output")
    output.add_argument("--out", default=None, help="CSV path (default results/<model>_<dataset>_<criterion>.csv)")
    output.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="skip cells already in the CSV (default: on when it exists with this "
                             "version's columns); --no-resume refuses a CSV that holds rows")
    output.add_argument("--overwrite", action="store_true",
                        help="start the CSV over, even when its rows were computed with other settings")
    output.add_argument("--plot", action="store_true", help="draw the CSV into a PNG beside it")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    run = p.add_argument_group("where and how it runs")
    run.add_argument("--gpu_id", type=int, default=-1, help="CUDA device index, -1 for the CPU")
    run.add_argument("--naive", action="store_true",
                     help="turn every shortcut off: retrace per cell, no cached gradients or channel "
                          "distances, every variant's whole forward pass by itself (for benchmarks; "
                          "same results up to float rounding in fused cells)")
    run.add_argument("--cache-mb", type=float, default=2048,
                     help="memory bound (MiB) of the pruned variants evaluated together in one pass "
                          "(chunks of cells; 0: one line of the log per chunk)")
    run.add_argument("--workers", type=int, default=1,
                     help="compute in this many local processes, each with its share of the cores: "
                          "they split the test set (plain cells) or the cells (budgets, fine-tuning)")
    run.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="compute cells as Ray tasks on this cluster ('auto': the one started on "
                          'this machine); needs pip install "intrafusion[ray]"')
    run.add_argument("--gpus-per-worker", type=float, default=0,
                     help="GPUs each Ray task asks for (0: the tasks compute on the CPU)")


def _budget_arguments(p: argparse.ArgumentParser, many: bool, allocation: str):
    """The "budget" group: --macs / --params (one value, or with `many` a list of budget cells),
    the allocation and the sensitivity profile's held-out images and cache."""
    from .allocation import ALLOCATIONS
    nargs = "+" if many else None
    budget = p.add_argument_group("budget")
    budget.add_argument("--macs", type=float, nargs=nargs, default=None,
                        help="fraction of the unpruned MACs to keep (all groups, per-group sparsities)")
    budget.add_argument("--params", type=float, nargs=nargs, default=None,
                        help="fraction of the unpruned parameters to keep")
    budget.add_argument("--allocation", nargs=nargs, default=[allocation] if many else allocation,
                        help=f"how the budget is shared among groups: {', '.join(ALLOCATIONS)}")
    budget.add_argument("--held-out", type=int, default=1000,
                        help="held-out training images (disjoint from calibration) for --allocation sensitivity")
    budget.add_argument("--profile-cache", default=None,
                        help="JSON of measured sensitivity profiles (default results/profiles.json)")
    return budget


def _lm_grid(args: argparse.Namespace, device: torch.device, kind: str, budgets) -> dict:
    """main.py for a language model (experiments/lm_grid.py): the flags it has."""
    from .experiments.lm_grid import LMGridConfig, run_lm_grid
    from .groups import FusionSettings
    for flag, given in (("--finetune-epochs", args.finetune_epochs), ("--workers", args.workers > 1),
                        ("--ray-address", args.ray_address), ("--gpus-per-worker", args.gpus_per_worker),
                        ("--profile-cache", args.profile_cache)):
        if given:
            raise IntraFusionError(f"{flag} is not available for language models")
    config = LMGridConfig(
        model_name=args.model_name, dataset=args.dataset,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        corpus_root=Path(args.corpus_root) if args.corpus_root else None,
        group_idxs=tuple(args.group_idxs), sparsities=tuple(args.sparsities),
        criteria=tuple(args.importance_criteria), methods=tuple(args.methods),
        fusion=FusionSettings(args.target, args.source_prob, args.target_prob, args.p, args.fusion_rule),
        device=str(device), repair_batches=args.repair_batches, budgets=tuple(budgets), budget_kind=kind,
        allocations=tuple(args.allocation), held_out=args.held_out, out=Path(args.out) if args.out else None,
        resume=args.resume, overwrite=args.overwrite, fast=not args.naive, cache_mb=args.cache_mb)
    return run_lm_grid(config, progress=not args.quiet and sys.stderr.isatty())


def _grid(args: argparse.Namespace) -> int:
    from .allocation import one_budget
    from .experiments.grid import GridConfig, run_grid
    from .experiments.lm_data import LANGUAGE_DATASETS, is_language_model
    from .groups import FusionSettings
    device = resolve_device(args.gpu_id)
    kind, budgets = one_budget(macs=args.macs, params=args.params) if args.macs or args.params else ("macs", ())
    if is_language_model(args.model_name) or args.dataset in LANGUAGE_DATASETS:
        results = _lm_grid(args, device, kind, budgets)
    else:
        config = GridConfig(
            model_name=args.model_name, dataset=args.dataset, data_dir=args.data_dir,
            checkpoint=Path(args.checkpoint) if args.checkpoint else None,
            group_idxs=tuple(args.group_idxs), sparsities=tuple(args.sparsities),
            criteria=tuple(args.importance_criteria), methods=tuple(args.methods),
            fusion=FusionSettings(args.target, args.source_prob, args.target_prob, args.p, args.fusion_rule),
            device=str(device), out=Path(args.out) if args.out else None, resume=args.resume,
            overwrite=args.overwrite, fast=not args.naive, cache_mb=args.cache_mb,
            repair_batches=args.repair_batches, finetune_epochs=args.finetune_epochs,
            finetune_lr=args.finetune_lr, budgets=tuple(budgets),
            budget_kind=kind, allocations=tuple(args.allocation),
            held_out=args.held_out, profile_cache=Path(args.profile_cache) if args.profile_cache else None,
            workers=args.workers, ray_address=args.ray_address, gpus_per_worker=args.gpus_per_worker)
        results = run_grid(config, progress=not args.quiet and sys.stderr.isatty())
    if args.plot:
        from .experiments.plotting import plot_all
        for path in results:
            for png in plot_all(path):
                print(f"wrote {png}")
    return 0


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", help="a CSV written by main.py")
    p.add_argument("--out", default=None, help="PNG path (default: the CSV's path with .png)")


def _plot(args: argparse.Namespace) -> int:
    from .experiments.plotting import plot_all
    for png in plot_all(args.csv, args.out):
        print(f"wrote {png}")
    return 0


def _compress_arguments(p: argparse.ArgumentParser) -> None:
    from .experiments.data import DATASET_NAMES
    from .importance import CRITERIA
    from .methods import METHOD_NAMES
    from .models import MODEL_NAMES
    what = p.add_argument_group("what to prune")
    what.add_argument("--model-name", required=True, help=f"one of {', '.join(MODEL_NAMES)}")
    what.add_argument("--checkpoint", default=None,
                      help="default models/<model>.checkpoint (cifar10), models/<dataset>/<model>.checkpoint; "
                           "a language model: the folder models/python-stdlib/<model>/")
    what.add_argument("--sparsity", type=float, default=None, help="fraction of each group's channels to prune")
    what.add_argument("--round-to", type=int, default=None, help="keep every group's width a multiple of this")
    budget = _budget_arguments(p, many=False, allocation="uniform")
    budget.add_argument("--iterative", action="store_true",
                        help="sensitivity: re-measure every group on the current plan after each step (slow)")
    method = p.add_argument_group("method")
    method.add_argument("--method", default="default_reconstruct",
                        help=f"one of {', '.join(METHOD_NAMES)} (default: the best measured, RESULTS.md)")
    method.add_argument("--criterion", default="l1", help=f"one of {', '.join(CRITERIA)}")
    method.add_argument("--finetune-epochs", type=int, default=0)
    method.add_argument("--finetune-lr", type=float, default=0.01)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", required=True,
                      help=f"one of {', '.join(DATASET_NAMES)}; python-stdlib for a language model")
    data.add_argument("--data-dir", default="data")
    data.add_argument("--corpus-root", default=None,
                      help="python-stdlib: the folder of .py files (default this Python's standard library)")
    data.add_argument("--calibration-batches", type=int, default=10,
                      help="training batches of 128 (a language model: of 4 windows) for repair, "
                           "reconstruction and the criteria that need data")
    output = p.add_argument_group("output")
    output.add_argument("--out", required=True, help="the compressed model (its report: the same name, .json)")
    output.add_argument("--onnx", default=None, metavar="PATH",
                        help="also write the compressed model as an ONNX file (any batch size)")
    run = p.add_argument_group("where it runs")
    run.add_argument("--gpu_id", type=int, default=-1, help="CUDA device index, -1 for the CPU")
    run.add_argument("--workers", type=int, default=1,
                     help="measure the sensitivity profile in this many local processes, each with "
                          "its share of the cores (a group's rungs at a time)")
    run.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="measure its groups as Ray tasks on this cluster ('auto': the one started on "
                          'this machine); needs pip install "intrafusion[ray]"')


def _compress(args: argparse.Namespace) -> int:
    from .experiments.compress import CompressConfig, run_compress
    device = resolve_device(args.gpu_id)
    run_compress(CompressConfig(
        model_name=args.model_name, dataset=args.dataset, out=Path(args.out), data_dir=args.data_dir,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None, sparsity=args.sparsity,
        macs=args.macs, params=args.params, method=args.method, criterion=args.criterion,
        allocation=args.allocation, calibration_batches=args.calibration_batches,
        finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, held_out=args.held_out,
        round_to=args.round_to, iterative=args.iterative,
        profile_cache=Path(args.profile_cache) if args.profile_cache else None, device=str(device),
        onnx=Path(args.onnx) if args.onnx else None, workers=args.workers, ray_address=args.ray_address,
        corpus_root=Path(args.corpus_root) if args.corpus_root else None))
    return 0


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to evaluate")
    what.add_argument("model", help="a compressed model written by `intrafusion compress` (a language "
                                    "model: its folder)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="the model's dataset; python-stdlib for a language model")
    data.add_argument("--data-dir", default="data")
    data.add_argument("--corpus-root", default=None,
                      help="python-stdlib: the folder of .py files (default this Python's standard library)")
    output = p.add_argument_group("output")
    output.add_argument("--json", action="store_true",
                        help="one JSON object: accuracy (a language model: perplexity), params, macs")
    run = p.add_argument_group("where it runs")
    run.add_argument("--gpu_id", type=int, default=-1, help="CUDA device index, -1 for the CPU")


def _evaluate(args: argparse.Namespace) -> int:
    import json
    from .experiments.compress import evaluate_saved
    result = evaluate_saved(args.model, args.dataset, args.data_dir, str(resolve_device(args.gpu_id)),
                            Path(args.corpus_root) if args.corpus_root else None)
    if args.json:
        print(json.dumps(result))
    elif "perplexity" in result:
        print(f"{args.model}: test perplexity {result['perplexity']:.3f} ({result['tokens']:,} tokens), "
              f"{result['params']:,} parameters ({result['block_params']:,} in the decoder blocks), "
              f"{result['macs']:,} MACs per window of {result['window_tokens']} tokens")
    else:
        print(f"{args.model}: test accuracy {100 * result['accuracy']:.2f}%, "
              f"{result['params']:,} parameters, {result['macs']:,} MACs")
    return 0


@dataclass(frozen=True)
class Command:
    """One subcommand: a one-line summary, the function adding its flags, the function running them."""
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = {
    "grid": Command("compare default pruning with Intra-Fusion per group and sparsity (= main.py)",
                    _grid_arguments, _grid),
    "train": Command("train a CIFAR-style model from scratch (= train.py)", _train_arguments, _train),
    "compress": Command("compress a checkpoint to a sparsity, MACs or parameter budget and save it",
                        _compress_arguments, _compress),
    "evaluate": Command("test accuracy (a language model: perplexity), parameters and MACs of a model "
                        "saved by compress",
                        _evaluate_arguments, _evaluate),
    "plot": Command("draw a results CSV into a PNG: accuracy against sparsity per group and method",
                    _plot_arguments, _plot),
}


def command_parser(name: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one command; `prog` names it in usage and errors (default `intrafusion <name>`)."""
    command = COMMANDS[name]
    p = _Parser(prog=prog or f"intrafusion {name}", description=command.summary)
    command.add_arguments(p)
    return p


def package_parser() -> argparse.ArgumentParser:
    """`intrafusion COMMAND …`: every command of COMMANDS as a subparser."""
    p = _Parser(prog="intrafusion", description="Intra-Fusion structured pruning "
                "(Theus et al., ICLR 2024); `intrafusion COMMAND --help` for a command's flags.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.summary,
                                                  description=command.summary))
    return p


def _execute(argv, name: str | None = None, prog: str | None = None) -> int:
    """Parse `argv` for the command `name` (None: argv's first word names it) and run it. Mistakes
    are one line `error: …` on stderr and exit code 2; Ctrl-C says that finished work is kept."""
    release_large_buffers()
    try:
        if name is None:
            args = package_parser().parse_args(argv)
            name = args.command
        else:
            args = command_parser(name, prog).parse_args(argv)
        return COMMANDS[name].run(args)
    except IntraFusionError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is saved, rerun the same command to resume",
              file=sys.stderr)
        return 130


def package_main(argv=None) -> int:
    """The `intrafusion` console command and `python -m intrafusion`."""
    return _execute(argv)


def main(argv=None) -> int:
    """main.py: `intrafusion grid` under its old name."""
    return _execute(argv, "grid", "main.py")


def train_main(argv=None) -> int:
    """train.py: `intrafusion train` under its old name."""
    return _execute(argv, "train", "train.py")
