"""The paper's experiment grid: default pruning vs Intra-Fusion per group, sparsity and criterion.

Every cell prunes a fresh copy of the folded network (the graph is traced once) and evaluates it
on the whole test set; each result is appended to the CSV as soon as it is known.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import default_checkpoint, ensure_unzipped, file_digest, load_weights, read_checkpoint
from .data import Dataset, load_dataset
from .errors import UserError
from .evaluation import accuracy
from .prefix import GridEvaluator
from .importance import CRITERIA, DATA_CRITERIA, Scorer
from .models import build_model
from .pruning import METHODS, FusionSettings, Pruner, kept_count
from .results import CsvLog

@dataclass
class GridConfig:
    model_name: str = "vgg11_bn"
    dataset: str = "cifar10"
    data_dir: str = "data"
    checkpoint: Path | None = None
    group_idxs: tuple = (1, 2, 3)
    sparsities: tuple = (0.3, 0.4, 0.5, 0.6, 0.7)
    criteria: tuple = ("l1",)
    methods: tuple = ("default", "intra_fusion")
    fusion: FusionSettings = field(default_factory=FusionSettings)
    device: str = "cpu"
    calibration_batches: int = 5
    batch_size: int = 128
    out: Path | None = None
    fast: bool = True

    def output_path(self, criterion: str) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path("results") / f"{self.model_name}_{self.dataset}_{criterion}.csv"

    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else default_checkpoint(self.model_name, self.dataset)


def calibration_batches(dataset: Dataset, count: int, batch_size: int, seed: int = 0):
    """`count` shuffled, unaugmented, normalized training batches (x, y) for taylor/chip."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset.train_labels), generator=generator)[: count * batch_size]
    return [(dataset.normalize(dataset.train_images[order[i:i + batch_size]]),
             dataset.train_labels[order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def validate(config: GridConfig) -> None:
    """Reject settings that cannot work before anything is loaded or written."""
    if not config.group_idxs:
        raise UserError("no group given: pass at least one index to --group_idxs")
    if not config.sparsities:
        raise UserError("no sparsity given: pass at least one value to --sparsities")
    for s in config.sparsities:
        if not 0 <= s < 1:
            raise UserError(f"sparsity {s} outside [0, 1): pass values like 0.3 0.5")
    for c in config.criteria:
        if c not in CRITERIA:
            raise UserError(f"unknown criterion {c!r}; choose one of {', '.join(CRITERIA)}")
    for m in config.methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; choose one of {', '.join(METHODS)}")


def prepare(config: GridConfig) -> tuple[Dataset, Pruner, float, str]:
    """Load data and checkpoint; return the dataset, the folded base pruner, the unpruned test
    accuracy and the checkpoint's sha256."""
    validate(config)
    try:
        model = build_model(config.model_name)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    path = config.checkpoint_path()
    ensure_unzipped(path)
    state = read_checkpoint(path)
    dataset = load_dataset(config.dataset, config.data_dir)
    if dataset.num_classes != 10:
        model = build_model(config.model_name, dataset.num_classes)
    load_weights(model, state["model_state_dict"], path)
    device = torch.device(config.device)
    model.to(device).eval()
    test_x, test_y = dataset.test_tensors()
    base_accuracy = accuracy(model, test_x, test_y)
    pruner = Pruner(model, test_x[:1].to(device), dataset.num_classes)
    for index in config.group_idxs:
        if not 0 <= index < len(pruner.groups):
            raise UserError(f"group index {index} out of range: {config.model_name} has "
                            f"{len(pruner.groups)} groups (0..{len(pruner.groups) - 1})")
        group, n = pruner.full_group(index)
        for s in config.sparsities:
            if kept_count(n, s) < 1:
                raise UserError(f"sparsity {s} would leave group {index} ({n} channels) with no channel")
    return dataset, pruner, base_accuracy, file_digest(path)


def run_grid(config: GridConfig, log=print) -> dict[str, list[dict]]:
    """Run every criterion × group × sparsity × method cell; return the rows per output file."""
    dataset, base, base_accuracy, digest = prepare(config)
    test_x, test_y = dataset.test_tensors()
    evaluator = GridEvaluator(base, test_x, test_y, fast=config.fast)
    fusion = config.fusion
    common = dict(model=config.model_name, dataset=config.dataset, fusion_rule=fusion.rule,
                  target=fusion.target, source_prob=fusion.source_prob,
                  target_prob=fusion.target_prob, p=fusion.p, checkpoint_sha256=digest)
    log(f"{config.model_name} on {config.dataset}: unpruned accuracy {100 * base_accuracy:.2f}%, "
        f"{len(base.groups)} groups")
    results: dict[str, list[dict]] = {}
    batches = None
    for criterion in config.criteria:
        if criterion in DATA_CRITERIA and batches is None:
            batches = calibration_batches(dataset, config.calibration_batches, config.batch_size)
            batches = [(x.to(config.device), y.to(config.device)) for x, y in batches]
        scorer = Scorer(criterion, batches)
        out = config.output_path(criterion)
        csv_log = CsvLog(out)
        rows = results.setdefault(str(out), [])
        row = dict(common, criterion=criterion, group=-1, sparsity=0.0, method="none",
                   accuracy=base_accuracy, params=count_params(base.model), prune_seconds=0.0)
        csv_log.write(row)
        rows.append(row)
        for group in config.group_idxs:
            for sparsity in config.sparsities:
                line = []
                for method in config.methods:
                    variant = base.copy()
                    start = time.perf_counter()
                    variant.prune([group], sparsity, method, scorer, fusion)
                    seconds = time.perf_counter() - start
                    acc = evaluator.accuracy(variant, [group])
                    row = dict(common, criterion=criterion, group=group, sparsity=sparsity,
                               method=method, accuracy=acc, params=count_params(variant.model),
                               prune_seconds=round(seconds, 4))
                    csv_log.write(row)
                    rows.append(row)
                    line.append(f"{method} {100 * acc:6.2f}%")
                log(f"{criterion:6s} group {group:2d} sparsity {sparsity:.2f}: " + "  ".join(line))
        csv_log.close()
        log(f"wrote {out}")
    return results
