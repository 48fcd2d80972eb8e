"""The paper's experiment grid: default pruning vs Intra-Fusion per group, sparsity and criterion.

Every cell prunes a fresh copy of the folded network (the graph is traced once) and evaluates it
on the whole test set; each result is appended to the CSV as soon as it is known. A rerun
continues the CSV: cells already in it are skipped, as long as they were computed with the same
checkpoint, data and fusion settings.
"""
from __future__ import annotations

import copy
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..errors import IntraFusionError
from ..evaluation import accuracy
from ..groups import FusionSettings, Pruner, check_sparsity, count_macs_params
from ..importance import CRITERIA, DATA_CRITERIA, Scorer
from ..methods import get_method
from ..models import MODEL_NAMES, build_model, pruner_options
from ..repair import reference_statistics, repair_pruned
from .checkpoints import default_checkpoint, ensure_unzipped, load_weights, read_checkpoint
from .data import DATASET_NAMES, Dataset, load_dataset
from .prefix import GridEvaluator
from .report import FT, finetune_table, summary_table
from .results import CsvLog, cell_key, previous_rows
from .storage import check_writable, file_digest
from .training import finetune


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
        raise IntraFusionError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")


def validate(config: GridConfig) -> None:
    """Reject settings that cannot work before anything is loaded or written (what needs the
    network, group ranges and widths, is checked by the Pruner in `prepare`; FusionSettings
    checks itself when it is made)."""
    _check_choice(config.model_name, MODEL_NAMES, "model name")
    _check_choice(config.dataset, DATASET_NAMES, "dataset")
    if not config.group_idxs:
        raise IntraFusionError("no group given: pass at least one index to --group_idxs")
    if not config.sparsities:
        raise IntraFusionError("no sparsity given: pass at least one value to --sparsities")
    for s in config.sparsities:
        check_sparsity(s)
    for c in config.criteria:
        _check_choice(c, CRITERIA, "criterion")
    methods = [get_method(m) for m in config.methods]
    for g in config.group_idxs:
        if g != "all" and not isinstance(g, int):
            raise IntraFusionError(f"group {g!r} is neither an index nor 'all'")
    if config.repair_batches < 1 and any(m.repair for m in methods):
        raise IntraFusionError("--repair-batches must be at least 1 for the *_repair methods")
    if config.finetune_epochs < 0 or (config.finetune_epochs and not config.finetune_lr > 0):
        raise IntraFusionError("--finetune-epochs must be >= 0 and --finetune-lr positive")


def open_checkpoint(config: GridConfig) -> tuple[dict, str]:
    """The configured checkpoint's contents and its sha256."""
    path = config.checkpoint_path()
    ensure_unzipped(path)
    return read_checkpoint(path), file_digest(path)


def prepare(config: GridConfig, checkpoint: tuple[dict, str] | None = None
            ) -> tuple[Dataset, tuple, Pruner, float, str, Callable[[], Pruner]]:
    """Load data and checkpoint (or use `checkpoint` from open_checkpoint); return the dataset,
    its normalized test tensors (images, labels), the folded base pruner, the unpruned test
    accuracy, the checkpoint's sha256, and a function that folds and traces a new base from
    scratch (the naive path's per-cell work)."""
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
    options = pruner_options(model)  # the Mixer's token layers, transformers' residual stream
    pruner = Pruner(model, test_x[:1].to(device), dataset.num_classes, **options)
    for index in group_list(pruner, config.group_idxs):
        for s in config.sparsities:
            pruner.check_prunable(index, s)
    rebuild = lambda: Pruner(copy.deepcopy(original), test_x[:1].to(device), dataset.num_classes, **options)  # noqa: E731
    return dataset, (test_x, test_y), pruner, base_accuracy, digest, rebuild


def group_list(pruner: Pruner, groups) -> list[int]:
    """The group indices named by `groups` ("all" = every prunable group), in order, once each;
    IntraFusionError for an index out of range."""
    every = range(len(pruner.groups))
    return _unique(pruner.check_group(i).index
                   for g in groups for i in (every if g == "all" else [g]))


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


class GridRun:
    """One run of the grid: the base network, data, evaluator and shared measurements, the rows
    already known (earlier runs' and this one's) and the CSV writers."""

    def __init__(self, config: GridConfig, log=tqdm.write):
        validate(config)
        self.config, self.log = config, log
        self.paths = {c: config.output_path(c) for c in _unique(config.criteria)}
        for path in set(self.paths.values()):
            check_writable(path)
        checkpoint = open_checkpoint(config)
        self.common = comparable_settings(config, checkpoint[1])
        self.previous = {path: previous_rows(path, self.common, config.resume, config.overwrite)
                         for path in _unique(self.paths.values())}
        self.done = {cell_key(r): r for rows in self.previous.values() for r in rows}
        self.dataset, (test_x, test_y), self.base, self.base_accuracy, _, rebuild = prepare(config, checkpoint)
        self.new_variant = self.base.copy if config.fast else rebuild
        self.evaluator = GridEvaluator(self.base, test_x, test_y, fast=config.fast,
                                       cache_mb=config.cache_mb)
        self.groups = _unique(config.group_idxs)
        self.evaluator.plan(g for g in self.groups if g != "all")
        self.example = test_x[:1].to(config.device)
        self.results: dict[str, list[dict]] = {str(p): [] for p in self.previous}
        self.logs: dict = {}
        self._repair = None
        self._batches = None

    def cells(self) -> list[tuple]:
        c = self.config
        return [(crit, g, s, m) for crit in self.paths for g in self.groups
                for s in _unique(c.sparsities) for m in _unique(c.methods)]

    def finished(self, cell: tuple) -> bool:
        """Whether the cell's row, and its fine-tuning rows, are all known."""
        epochs = [(cell[3], 0)] + [(cell[3] + FT, e) for e in range(1, self.config.finetune_epochs + 1)]
        return all((*cell[:3], m, e) in self.done for m, e in epochs)

    def record(self, row: dict) -> dict:
        """Write a new row (a known cell keeps its earlier row); add it to the results."""
        key = cell_key(row)
        path = self.paths[row["criterion"]]
        if key not in self.done:
            self.logs[path].write(row)
            self.done[key] = row
        self.results[str(path)].append(self.done[key])
        return self.done[key]

    def replay(self, cell: tuple) -> None:
        """Add the known rows of a finished cell to the results, in epoch order."""
        for key in sorted(k for k in self.done if k[:3] == cell[:3] and k[3] in (cell[3], cell[3] + FT)):
            self.record(self.done[key])

    def repair_data(self):
        """(batches, unpruned reference statistics) for the *_repair methods, measured once."""
        if self._repair is None:
            c = self.config
            batches = calibration_batches(self.dataset, c.repair_batches, c.batch_size, seed=1)
            batches = [(x.to(c.device), y) for x, y in batches]
            self._repair = (batches, reference_statistics(self.base.model, batches))
        return self._repair

    def scorer(self, criterion: str) -> Scorer:
        """A Scorer for `criterion`, with the calibration batches (drawn once) when it needs data."""
        c = self.config
        if criterion in DATA_CRITERIA and self._batches is None:
            batches = calibration_batches(self.dataset, c.calibration_batches, c.batch_size)
            self._batches = [(x.to(c.device), y.to(c.device)) for x, y in batches]
        return Scorer(criterion, self._batches if criterion in DATA_CRITERIA else None, cache=c.fast)

    def row(self, criterion, group, sparsity, method, model, accuracy_, seconds=0.0) -> dict:
        return dict(self.common, criterion=criterion, group=group, sparsity=sparsity, method=method,
                    accuracy=accuracy_, params=count_params(model), prune_seconds=round(seconds, 4),
                    macs=count_macs_params(model, self.example)[0], epoch=0)

    def prune_cell(self, scorer: Scorer, cell: tuple) -> tuple[dict, Pruner]:
        """Prune a new variant for cell (criterion, group, sparsity, method); its row and the variant."""
        criterion, group, sparsity, name = cell
        method = get_method(name)
        variant = self.new_variant()
        scorer.generator.manual_seed(_cell_seed(group, sparsity))
        start = time.perf_counter()
        variant.prune(group_list(self.base, [group]), sparsity, method.pruning, scorer,
                      method.fusion(self.config.fusion))
        if method.repair:
            repair_pruned(self.base, variant, *self.repair_data())
        seconds = time.perf_counter() - start
        return self.row(*cell, variant.model, self.evaluator.accuracy(variant), seconds), variant

    def finetune_rows(self, variant: Pruner, row: dict) -> None:
        """Fine-tune the variant, recording a "+ft" row with the test accuracy after each epoch."""
        def on_epoch(epoch: int, model) -> None:
            self.record(dict(row, method=row["method"] + FT, epoch=epoch,
                             accuracy=self.evaluator.accuracy(variant)))

        c = self.config
        finetune(variant.model, self.dataset, c.finetune_epochs, c.finetune_lr, c.batch_size,
                 device=torch.device(c.device), on_epoch=on_epoch)

    def run_criterion(self, criterion: str, bar) -> None:
        """Every cell of one criterion: the unpruned row, then group × sparsity × method."""
        scorer = self.scorer(criterion)
        self.record(self.row(criterion, -1, 0.0, "none", self.base.model, self.base_accuracy))
        for group in self.groups:
            for sparsity in _unique(self.config.sparsities):
                line = []
                for method in _unique(self.config.methods):
                    cell = (criterion, group, sparsity, method)
                    if self.finished(cell):
                        self.replay(cell)
                        continue
                    row, variant = self.prune_cell(scorer, cell)
                    row = self.record(row)
                    if self.config.finetune_epochs:
                        self.finetune_rows(variant, row)
                    bar.update()
                    line.append(f"{method} {100 * row['accuracy']:6.2f}%")
                if line:
                    self.log(f"{criterion:6s} group {group!s:>2} sparsity {sparsity:.2f}: " + "  ".join(line))

    def run(self, progress: bool = False) -> dict[str, list[dict]]:
        cells = self.cells()
        finished = sum(map(self.finished, cells))
        self.log(f"{self.config.model_name} on {self.config.dataset}: unpruned accuracy "
                 f"{100 * self.base_accuracy:.2f}%, {len(self.base.groups)} groups"
                 + (f"; resuming, {finished} of {len(cells)} cells done" if finished else ""))
        with ExitStack() as stack:
            self.logs = {p: stack.enter_context(CsvLog(p, fresh=not self.previous[p]))
                         for p in self.previous}
            bar = stack.enter_context(tqdm(total=len(cells), initial=finished, disable=not progress,
                                           desc="grid", unit="cell"))
            for criterion in self.paths:
                self.run_criterion(criterion, bar)
        for criterion, path in self.paths.items():
            self.log(summary_table(self.results[str(path)], criterion))
            recovery = finetune_table(self.results[str(path)], criterion)
            if recovery is not None:
                self.log(recovery)
        for path in self.results:
            self.log(f"wrote {path}")
        return self.results


def run_grid(config: GridConfig, log=tqdm.write, progress: bool = False) -> dict[str, list[dict]]:
    """Run every criterion × group × sparsity × method cell not yet in its output CSV; return
    the grid's rows (earlier and new) per output file. `progress` shows a bar on stderr."""
    return GridRun(config, log).run(progress)
