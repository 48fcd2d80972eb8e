"""The paper's experiment grid: default pruning vs Intra-Fusion per group, sparsity and criterion.

Every cell prunes a fresh copy of the folded network (the graph is traced once) and evaluates it
on the whole test set; each result is appended to the CSV as soon as it is known. A rerun
continues the CSV: cells already in it are skipped, as long as they were computed with the same
checkpoint, data and fusion settings.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .checkpoints import default_checkpoint, ensure_unzipped, load_weights, read_checkpoint
from .data import DATASET_NAMES, Dataset, load_dataset
from .errors import UserError
from .evaluation import accuracy
from .fusion import FUSION_RULES
from .prefix import GridEvaluator
from .importance import CRITERIA, DATA_CRITERIA, Scorer
from .models import MODEL_NAMES, build_model
from .training import finetune
from .pruning import FusionSettings, Pruner, count_macs_params, kept_count
from .repair import reference_statistics, repair_pruned
from .report import finetune_table, summary_table
from .results import CsvLog, cell_key, previous_rows
from .storage import check_writable, file_digest
from .transport import MARGINALS, TARGETS

GRID_METHODS = ("default", "intra_fusion", "default_repair", "intra_fusion_repair",
                "intra_fusion_varfix", "intra_fusion_varfix_repair")


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
    fast: bool = True           # False: the naive path, every shortcut off (bench/grid_speed.py)
    cache_mb: float = 2048      # memory budget of cached prefix activations
    repair_batches: int = 10    # unlabeled training batches for the *_repair methods
    finetune_epochs: int = 0    # fine-tune every pruned network, one "+ft" row per epoch
    finetune_lr: float = 0.01
    resume: bool | None = None  # None: continue the output CSV when it exists and matches
    overwrite: bool = False     # start the output CSV over, whatever it holds

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


def _check_choice(value, choices, what: str) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")


def validate(config: GridConfig) -> None:
    """Reject settings that cannot work before anything is loaded or written."""
    _check_choice(config.model_name, MODEL_NAMES, "model name")
    _check_choice(config.dataset, DATASET_NAMES, "dataset")
    _check_choice(config.fusion.target, TARGETS, "target")
    _check_choice(config.fusion.source_prob, MARGINALS, "source marginal")
    _check_choice(config.fusion.target_prob, MARGINALS, "target marginal")
    _check_choice(config.fusion.rule, FUSION_RULES, "fusion rule")
    if not config.fusion.p > 0:
        raise UserError(f"p must be positive, got {config.fusion.p}")
    if not config.group_idxs:
        raise UserError("no group given: pass at least one index to --group_idxs")
    if not config.sparsities:
        raise UserError("no sparsity given: pass at least one value to --sparsities")
    for s in config.sparsities:
        if not 0 <= s < 1:
            raise UserError(f"sparsity {s} outside [0, 1): pass values like 0.3 0.5")
    for c in config.criteria:
        _check_choice(c, CRITERIA, "criterion")
    for m in config.methods:
        _check_choice(m, GRID_METHODS, "method")
    for g in config.group_idxs:
        if g != "all" and not isinstance(g, int):
            raise UserError(f"group {g!r} is neither an index nor 'all'")
    if config.repair_batches < 1 and any(m.endswith("_repair") for m in config.methods):
        raise UserError("--repair-batches must be at least 1 for the *_repair methods")
    if config.finetune_epochs < 0 or (config.finetune_epochs and not config.finetune_lr > 0):
        raise UserError("--finetune-epochs must be >= 0 and --finetune-lr positive")


def open_checkpoint(config: GridConfig) -> tuple[dict, str]:
    """The configured checkpoint's contents and its sha256."""
    path = config.checkpoint_path()
    ensure_unzipped(path)
    return read_checkpoint(path), file_digest(path)


def prepare(config: GridConfig, checkpoint: tuple[dict, str] | None = None
            ) -> tuple[Dataset, tuple, Pruner, float, str, Callable[[], Pruner]]:
    """Load data and checkpoint (or use `checkpoint` from open_checkpoint); return the dataset,
    its normalized test tensors (images, labels), the folded base pruner, the unpruned test accuracy, the checkpoint's sha256, and a function
    that folds and traces a new base from scratch (the naive path's per-cell work)."""
    validate(config)
    state, digest = checkpoint or open_checkpoint(config)
    dataset = load_dataset(config.dataset, config.data_dir)
    model = build_model(config.model_name, dataset.num_classes)
    load_weights(model, state["model_state_dict"], config.checkpoint_path())
    device = torch.device(config.device)
    model.to(device).eval()
    test_x, test_y = dataset.test_tensors()
    base_accuracy = accuracy(model, test_x, test_y)
    original = copy.deepcopy(model)
    pruner = Pruner(model, test_x[:1].to(device), dataset.num_classes)
    for g in config.group_idxs:
        if g != "all" and not 0 <= g < len(pruner.groups):
            raise UserError(f"group index {g} out of range: {config.model_name} has "
                            f"{len(pruner.groups)} groups (0..{len(pruner.groups) - 1})")
    for index in group_list(pruner, config.group_idxs):
        group, n = pruner.full_group(index)
        for s in config.sparsities:
            if kept_count(n, s) < 1:
                raise UserError(f"sparsity {s} would leave group {index} ({n} channels) with no channel")
    rebuild = lambda: Pruner(copy.deepcopy(original), test_x[:1].to(device), dataset.num_classes)  # noqa: E731
    return dataset, (test_x, test_y), pruner, base_accuracy, digest, rebuild


def group_list(pruner: Pruner, groups) -> list[int]:
    """The group indices named by `groups` ("all" = every prunable group), in order, once each."""
    every = range(len(pruner.groups))
    return _unique(i for g in groups for i in (every if g == "all" else [g]))


def comparable_settings(config: GridConfig, digest: str) -> dict:
    """What every row of a CSV must share to be comparable (results.COMPARABLE)."""
    f = config.fusion
    return dict(model=config.model_name, dataset=config.dataset, checkpoint_sha256=digest,
                fusion_rule=f.rule, target=f.target, source_prob=f.source_prob,
                target_prob=f.target_prob, p=f.p, repair_batches=config.repair_batches,
                finetune_epochs=config.finetune_epochs, finetune_lr=config.finetune_lr)


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def _cell_seed(group: int, sparsity: float) -> int:
    """Seed of the random criterion for a cell: both methods, and a resumed run, draw the same."""
    return zlib.crc32(f"{group}:{sparsity!r}".encode())


def method_recipe(method: str, fusion: FusionSettings) -> tuple[str, FusionSettings, bool]:
    """A grid method as (pruning method, fusion settings, repair statistics afterwards)."""
    repair = method.endswith("_repair")
    name = method.removesuffix("_repair")
    if name == "intra_fusion_varfix":
        return "intra_fusion", dataclasses.replace(fusion, rule="varfix"), repair
    return name, fusion, repair


class _Context:
    """What every cell of a run shares: the base network, data, evaluator and measurements."""

    def __init__(self, config: GridConfig, dataset: Dataset, base: Pruner, new_variant, evaluator,
                 common: dict):
        self.config, self.dataset, self.base = config, dataset, base
        self.new_variant, self.evaluator, self.common = new_variant, evaluator, common
        self.example = evaluator.images[:1].to(config.device)
        self._repair = None

    def repair_batches(self):
        """(batches, unpruned reference statistics) for the *_repair methods, measured once."""
        if self._repair is None:
            batches = calibration_batches(self.dataset, self.config.repair_batches,
                                          self.config.batch_size, seed=1)
            batches = [(x.to(self.config.device), y) for x, y in batches]
            self._repair = (batches, reference_statistics(self.base.model, batches))
        return self._repair

    def macs(self, model) -> int:
        return count_macs_params(model, self.example)[0]


def _prune_cell(ctx: _Context, scorer: Scorer, cell: tuple) -> tuple[dict, Pruner]:
    """Prune a new variant for cell (criterion, group, sparsity, method); its row and the variant."""
    criterion, group, sparsity, method = cell
    pruning, fusion, repair = method_recipe(method, ctx.config.fusion)
    variant = ctx.new_variant()
    scorer.generator.manual_seed(_cell_seed(group, sparsity))
    start = time.perf_counter()
    variant.prune(group_list(ctx.base, [group]), sparsity, pruning, scorer, fusion)
    if repair:
        batches, reference = ctx.repair_batches()
        repair_pruned(ctx.base, variant, batches, reference)
    seconds = time.perf_counter() - start
    acc = ctx.evaluator.accuracy(variant)
    row = dict(ctx.common, criterion=criterion, group=group, sparsity=sparsity, method=method,
               accuracy=acc, params=count_params(variant.model), prune_seconds=round(seconds, 4),
               macs=ctx.macs(variant.model), epoch=0)
    return row, variant


def _finetune_rows(ctx: _Context, variant: Pruner, row: dict, record) -> None:
    """Fine-tune the variant, recording a "+ft" row with the test accuracy after each epoch."""
    def on_epoch(epoch: int, model) -> None:
        record(dict(row, method=row["method"] + "+ft", epoch=epoch,
                    accuracy=ctx.evaluator.accuracy(variant)))

    finetune(variant.model, ctx.dataset, ctx.config.finetune_epochs, ctx.config.finetune_lr,
             ctx.config.batch_size, device=torch.device(ctx.config.device), on_epoch=on_epoch)


def run_grid(config: GridConfig, log=tqdm.write, progress: bool = False) -> dict[str, list[dict]]:
    """Run every criterion × group × sparsity × method cell not yet in its output CSV; return
    the grid's rows (earlier and new) per output file. `progress` shows a bar on stderr."""
    validate(config)
    paths = {c: config.output_path(c) for c in _unique(config.criteria)}
    for path in set(paths.values()):
        check_writable(path)
    checkpoint = open_checkpoint(config)
    common = comparable_settings(config, checkpoint[1])
    previous = {path: previous_rows(path, common, config.resume, config.overwrite)
                for path in _unique(paths.values())}
    done = {cell_key(r): r for rows in previous.values() for r in rows}
    dataset, (test_x, test_y), base, base_accuracy, _, rebuild = prepare(config, checkpoint)
    new_variant = base.copy if config.fast else rebuild
    evaluator = GridEvaluator(base, test_x, test_y, fast=config.fast, cache_mb=config.cache_mb)
    groups, sparsities, methods = (_unique(config.group_idxs), _unique(config.sparsities),
                                   _unique(config.methods))
    evaluator.plan(g for g in groups if g != "all")
    cells = [(c, g, s, m) for c in paths for g in groups for s in sparsities for m in methods]

    def finished_cell(cell) -> bool:
        epochs = [(cell[3], 0)] + [(cell[3] + "+ft", e) for e in range(1, config.finetune_epochs + 1)]
        return all((*cell[:3], m, e) in done for m, e in epochs)

    finished = sum(map(finished_cell, cells))
    log(f"{config.model_name} on {config.dataset}: unpruned accuracy {100 * base_accuracy:.2f}%, "
        f"{len(base.groups)} groups" + (f"; resuming, {finished} of {len(cells)} cells done"
                                        if finished else ""))
    results: dict[str, list[dict]] = {str(p): [] for p in previous}
    ctx = _Context(config, dataset, base, new_variant, evaluator, common)
    batches = None
    with ExitStack() as stack:
        logs = {p: stack.enter_context(CsvLog(p, fresh=not previous[p])) for p in previous}
        bar = stack.enter_context(tqdm(total=len(cells), initial=finished, disable=not progress,
                                       desc="grid", unit="cell"))

        def record(row: dict) -> dict:
            """Write a new row (a known cell keeps its earlier row); add it to the results."""
            key = cell_key(row)
            if key not in done:
                logs[paths[row["criterion"]]].write(row)
                done[key] = row
            results[str(paths[row["criterion"]])].append(done[key])
            return done[key]

        for criterion in paths:
            if criterion in DATA_CRITERIA and batches is None:
                batches = calibration_batches(dataset, config.calibration_batches, config.batch_size)
                batches = [(x.to(config.device), y.to(config.device)) for x, y in batches]
            scorer = Scorer(criterion, batches, cache=config.fast)
            record(dict(common, criterion=criterion, group=-1, sparsity=0.0, method="none",
                        accuracy=base_accuracy, params=count_params(base.model), prune_seconds=0.0,
                        macs=ctx.macs(base.model), epoch=0))
            for group in groups:
                for sparsity in sparsities:
                    line = []
                    for method in methods:
                        cell = (criterion, group, sparsity, method)
                        if finished_cell(cell):
                            for key in sorted(k for k in done if k[:3] == cell[:3]
                                              and k[3] in (method, method + "+ft")):
                                record(done[key])
                            continue
                        row, variant = _prune_cell(ctx, scorer, cell)
                        row = record(row)
                        if config.finetune_epochs:
                            _finetune_rows(ctx, variant, row, record)
                        bar.update()
                        line.append(f"{method} {100 * row['accuracy']:6.2f}%")
                    if line:
                        log(f"{criterion:6s} group {group!s:>2} sparsity {sparsity:.2f}: "
                            + "  ".join(line))
    for criterion, path in paths.items():
        log(summary_table(results[str(path)], criterion))
        recovery = finetune_table(results[str(path)], criterion)
        if recovery is not None:
            log(recovery)
    for path in results:
        log(f"wrote {path}")
    return results
