"""What the `compress` and `evaluate` commands do: compress a checkpoint to a budget and save it,
or measure a saved compressed model.

Data: the calibration batches (repair, and the criteria that need data) are
grid.calibration_batches(seed=1), the repair batches of the grid; the held-out images of the
sensitivity allocation are grid.held_out_indices of the training set, disjoint from them. The
test set is used for nothing but the reported accuracies.

`--workers N` / `--ray-address` measure the sensitivity profile's rungs in other processes
(parallel.py): each worker loads the same checkpoint and data and builds the network, method and
held-out loss as api.compress does (`ProfileRun`), and measures a group's rungs at a time; the
driver keeps every group's points in the profile cache as they arrive, solves and compresses.
"""
from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..allocation import ALLOCATIONS, HeldOutLoss, check_budget, measure_rungs, one_budget, plan_from_widths
from ..errors import IntraFusionError, check_at_least, check_positive
from ..evaluation import accuracy
from ..export import export_onnx
from ..groups import Pruner, check_sparsity, count_macs_params
from ..importance import CRITERIA, DATA_CRITERIA
from ..methods import get_method
from ..models import MODEL_NAMES
from .allocator import reuse_freed_buffers
from .checkpoints import model_from_state
from .data import DATASET_NAMES, load_dataset
from .lm_compress import evaluate_saved_lm, run_compress_lm, validate_lm
from .lm_data import LANGUAGE_DATASETS, is_language_model
from .grid import (GridConfig, calibration_batches, calibration_indices, held_out_indices,
                   open_checkpoint)
from .parallel import check_pool, open_pool
from ..storage import atomic_write, check_writable
from .training import finetune


@dataclass
class CompressConfig:
    """The settings of one `compress` run (the CLI's flags); exactly one of sparsity, macs, params."""

    model_name: str
    dataset: str
    out: Path
    data_dir: str = "data"
    checkpoint: Path | None = None
    sparsity: float | None = None
    macs: float | None = None
    params: float | None = None
    method: str = "default_reconstruct"
    criterion: str = "l1"
    allocation: str = "uniform"
    calibration_batches: int = 10
    batch_size: int = 128
    finetune_epochs: int = 0
    finetune_lr: float = 0.01
    held_out: int = 1000
    round_to: int | None = None
    iterative: bool = False
    profile_cache: Path | None = None   # default results/profiles.json
    device: str = "cpu"
    onnx: Path | None = None            # also write the compressed model there (export_onnx)
    workers: int = 1                    # local processes measuring the profile's rungs (1: this one)
    ray_address: str | None = None      # measure them as Ray tasks on this cluster ("auto": this machine's)
    gpus_per_worker: float = 0          # GPUs each Ray task asks for (0: it computes on the CPU)
    corpus_root: Path | None = None     # language models: the python-stdlib corpus folder (default this Python's)

    def budget(self) -> tuple[str, float]:
        """(kind, value) of the one budget given; IntraFusionError for none or several."""
        return one_budget(sparsity=self.sparsity, macs=self.macs, params=self.params)

    def report_path(self) -> Path:
        return Path(self.out).with_suffix(".json")

    def cache_path(self) -> Path:
        return Path(self.profile_cache or Path("results") / "profiles.json")

    def profiled(self) -> bool:
        """Whether the plan comes from a sensitivity profile (what workers can measure)."""
        return self.allocation == "sensitivity" and not self.iterative


def check_budget_and_data(config: CompressConfig) -> None:
    """Reject a budget out of range, and no calibration batches for a method or criterion that
    needs them (shared by image models and language models)."""
    kind, value = config.budget()
    if kind == "sparsity" and config.allocation == "uniform":
        check_sparsity(value)
    else:
        check_budget(kind, value)
    method = get_method(config.method)
    needs_data = [what for what, needed in ((f"method {method.name!r}", method.needs_data),
                                            (f"criterion {config.criterion!r}", config.criterion in DATA_CRITERIA))
                  if needed]
    if config.calibration_batches < 1 and needs_data:
        raise IntraFusionError(f"{needs_data[0]} needs calibration data: --calibration-batches must be at least 1")


def validate(config: CompressConfig) -> None:
    """Reject settings that cannot work before anything is loaded or written (a language model's
    through lm_compress.validate_lm)."""
    if is_language_model(config.model_name) or config.dataset in LANGUAGE_DATASETS:
        validate_lm(config)
        check_budget_and_data(config)
        return
    for value, choices, what in ((config.model_name, MODEL_NAMES, "model name"),
                                 (config.dataset, DATASET_NAMES, "dataset"),
                                 (config.criterion, CRITERIA, "criterion"),
                                 (config.allocation, ALLOCATIONS, "allocation")):
        if value not in choices:
            raise IntraFusionError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    check_budget_and_data(config)
    check_at_least(("--calibration-batches", config.calibration_batches, 0),
                               ("--finetune-epochs", config.finetune_epochs, 0),
                               ("--held-out", config.held_out, 1), ("--batch-size", config.batch_size, 1))
    check_positive("--finetune-lr", config.finetune_lr)
    check_pool(config)
    if (config.workers > 1 or config.ray_address) and config.criterion == "random":
        raise IntraFusionError("criterion 'random' draws its scores in the order the rungs are pruned, "
                               "so workers would profile other channels: drop --workers / --ray-address")
    paths = [Path(config.out), config.report_path(), *([config.onnx] if config.onnx is not None else [])]
    for path in paths + ([config.cache_path()] if config.profiled() else []):
        check_writable(path)


def measure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"accuracy" (fraction of `images`), "params", "macs" (op counter, one image)} of `model`."""
    macs, params = count_macs_params(model, images[:1])
    return {"accuracy": accuracy(model, images, labels), "params": params, "macs": macs}


def held_out_set(dataset, config: CompressConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized held-out training images and labels, disjoint from the calibration batches."""
    n = len(dataset.train_labels)
    used = calibration_indices(n, config.calibration_batches, config.batch_size, seed=1)
    index = held_out_indices(n, config.held_out, used)
    return dataset.normalize(dataset.train_images[index]), dataset.train_labels[index]


def open_inputs(config: CompressConfig, device: torch.device):
    """(checkpoint sha256, data set, unpruned model on `device` in eval mode, calibration batches,
    held-out images and labels or None) of a run: what the driver and every worker load alike."""
    grid = GridConfig(model_name=config.model_name, dataset=config.dataset, checkpoint=config.checkpoint)
    state, digest = open_checkpoint(grid)
    dataset = load_dataset(config.dataset, config.data_dir)
    model = model_from_state(config.model_name, dataset.num_classes, state["model_state_dict"],
                             grid.checkpoint_path()).to(device).eval()
    calibration = [(x.to(device), y.to(device)) for x, y in
                   calibration_batches(dataset, config.calibration_batches, config.batch_size, seed=1)]
    held_out = None
    if config.allocation == "sensitivity":
        held_out = tuple(t.to(device) for t in held_out_set(dataset, config))
    return digest, dataset, model, calibration, held_out


class ProfileRun:
    """A worker's copy of what the profile's rungs need (parallel.worker_load): the network folded
    as api.compress folds it, the method with its repair (api.variant_pruner) and the held-out
    loss, from the same checkpoint and data as the driver's. Computes, writes nothing."""

    def __init__(self, config: CompressConfig):
        from ..api import calibration_pairs, folded_base, fusion_settings, make_scorer, variant_pruner
        reuse_freed_buffers()
        device = torch.device(config.device)
        _, dataset, model, calibration, held_out = open_inputs(config, device)
        self.base = folded_base(model, dataset.test_tensors(1)[0].to(device))
        batches = calibration_pairs(calibration)
        self.prune = variant_pruner(self.base, get_method(config.method), make_scorer(config.criterion, batches),
                                    fusion_settings({}), batches)
        self.loss = HeldOutLoss(self.base, *held_out)

    def compute(self, rungs: list[tuple[int, float]]) -> list[float]:
        """The loss increases of the rungs (group, sparsity) (allocation.measure_rungs)."""
        return measure_rungs(self.base, self.prune, self.loss, rungs)

    @property
    def base_accuracy(self) -> float:
        """The unpruned network's accuracy on the held-out images (what the pools report)."""
        return self.loss.evaluator.base_accuracy


def load_profile_run(config: CompressConfig) -> ProfileRun:
    """A worker's ProfileRun of `config` (parallel.worker_load)."""
    return ProfileRun(config)


def run_compress(config: CompressConfig, log=print) -> dict:
    """Compress the checkpoint, fine-tune it if asked, save it (intrafusion.save) to config.out
    and its report beside it (.json); return the report. The pool of `--workers` or
    `--ray-address` (for a sensitivity profile) opens first: a Ray cluster is reached before
    anything is loaded, and local workers load their copies while this process loads its own.
    This process's allocator keeps freed buffers for reuse (allocator.reuse_freed_buffers)."""
    from ..api import compress
    from ..serialize import save
    validate(config)
    if is_language_model(config.model_name) or config.dataset in LANGUAGE_DATASETS:
        return run_compress_lm(config, log)
    reuse_freed_buffers()
    start = time.perf_counter()
    kind, value = config.budget()
    device = torch.device(config.device)
    with open_pool(config, load_profile_run, log) if config.profiled() else nullcontext() as pool:
        digest, dataset, model, calibration, held_out = open_inputs(config, device)
        test_x, test_y = dataset.test_tensors()
        test_x, test_y = test_x.to(device), test_y.to(device)
        base = measure(model, test_x, test_y)
        log(f"{config.model_name} on {config.dataset}: unpruned {100 * base['accuracy']:.2f}%, "
            f"{base['macs'] / 1e6:.1f} M MACs, {base['params'] / 1e6:.2f} M parameters")
        small = compress(model, test_x[:1], **{kind: value}, method=config.method,
                         criterion=config.criterion, calibration=calibration or None,
                         allocation=config.allocation, held_out=held_out, round_to=config.round_to,
                         iterative=config.iterative, profile_cache=config.cache_path(), profile_pool=pool)
    plan = plan_from_widths(Pruner(copy.deepcopy(model), test_x[:1], dataset.num_classes), small)
    if config.finetune_epochs:
        finetune(small, dataset, config.finetune_epochs, config.finetune_lr, config.batch_size, device)
    compressed = measure(small, test_x, test_y)
    save(small, config.out)
    if config.onnx is not None:
        export_onnx(small, test_x[:1], config.onnx)
        log(f"wrote {config.onnx} (ONNX)")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    report = {"base": base, "compressed": compressed, "sparsities": {str(g): s for g, s in plan.items()},
              "settings": {**settings, "checkpoint_sha256": digest},
              "seconds": round(time.perf_counter() - start, 2)}
    atomic_write(config.report_path(), (json.dumps(report, indent=1) + "\n").encode(),
                 "rerun the compress command")
    log(f"compressed: {100 * compressed['accuracy']:.2f}%, {100 * compressed['macs'] / base['macs']:.1f}% "
        f"of the MACs, {100 * compressed['params'] / base['params']:.1f}% of the parameters; "
        f"wrote {config.out} and {config.report_path()}")
    return report


def evaluate_saved(path: Path | str, dataset: str, data_dir: str = "data", device: str = "cpu",
                   corpus_root: Path | None = None) -> dict:
    """{"accuracy", "params", "macs"} of the compressed model saved at `path` on the whole test set
    (the same measurement as the compress report's "compressed", with the allocator as
    run_compress sets it); for a language model's folder and corpus (lm_compress.evaluate_saved_lm),
    its test perplexity instead of the accuracy."""
    from ..serialize import load
    if dataset in LANGUAGE_DATASETS:
        return evaluate_saved_lm(path, dataset, corpus_root, device)
    if Path(path).is_dir():
        raise IntraFusionError(f"{path} is a folder (a compressed language model?): pass "
                               f"--dataset {' or '.join(LANGUAGE_DATASETS)}, or a file written by compress")
    if dataset not in DATASET_NAMES:
        raise IntraFusionError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    reuse_freed_buffers()
    model = load(path).to(device).eval()
    test_x, test_y = load_dataset(dataset, data_dir).test_tensors()
    return measure(model, test_x.to(device), test_y.to(device))
