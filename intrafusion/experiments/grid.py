"""The paper's experiment grid: default pruning vs Intra-Fusion per group, sparsity and criterion.

Every cell prunes a fresh copy of the folded network (the graph is traced once) and evaluates it
on the whole test set, together with the other cells of its chunk (one pass, evaluator.py);
each chunk's results are appended to the CSV as soon as they are known. A rerun
continues the CSV: cells already in it are skipped, as long as they were computed with the same
checkpoint, data and fusion settings.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..allocation import ALLOCATIONS, allocate, check_budget, group_widths, measure_cost_model
from ..errors import IntraFusionError, check_at_least, check_positive
from ..groups import FusionSettings, Pruner, check_sparsity, count_macs_params, kept_count
from ..importance import CRITERIA, DATA_CRITERIA, Scorer
from ..methods import get_method
from ..models import MODEL_NAMES, pruner_options
from ..repair import RepairInputs, reference_statistics, repair_pruned
from ..reconstruct import reconstruct_pruned
from .checkpoints import default_checkpoint, ensure_unzipped, model_from_state, read_checkpoint
from .data import DATASET_NAMES, Dataset, load_dataset
from .parallel import check_pool, open_pool, split_lines
from ..evaluator import EVAL_BATCH, GridEvaluator, own_storage, shard_slice, share_unchanged
from .report import FT, result_tables
from .results import CsvLog, cell_key, previous_rows
from ..storage import check_writable, file_digest
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
    eval_batch_size: int = EVAL_BATCH  # test images per evaluation batch (and the unit of --workers' shards)
    out: Path | None = None
    fast: bool = True           # False: the naive path, every shortcut off (bench/grid_speed.py)
    cache_mb: float = 2048      # memory bound of the pruned variants evaluated together (chunks)
    repair_batches: int = 10    # unlabeled training batches for the *_repair methods
    finetune_epochs: int = 0    # fine-tune every pruned network, one "+ft" row per epoch
    finetune_lr: float = 0.01
    resume: bool | None = None  # None: continue the output CSV when it exists and matches
    budgets: tuple = ()         # fractions of the unpruned cost to keep: budget cells over all groups
    budget_kind: str = "macs"   # what the budgets count: macs or params
    allocations: tuple = ("uniform",)   # allocation.ALLOCATIONS, for the budget cells
    held_out: int = 1000        # held-out training images for the sensitivity profile
    profile_cache: Path | None = None   # JSON of sensitivity profiles (default results/profiles.json)
    overwrite: bool = False     # start the output CSV over, whatever it holds
    workers: int = 1            # local processes computing cells (1: this one; parallel.py)
    ray_address: str | None = None  # compute cells as Ray tasks on this cluster ("auto": this machine's)
    gpus_per_worker: float = 0  # GPUs each Ray task asks for (0: it computes on the CPU)

    def output_path(self, criterion: str) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path("results") / f"{self.model_name}_{self.dataset}_{criterion}.csv"

    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else default_checkpoint(self.model_name, self.dataset)


def calibration_indices(train_size: int, count: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Indices into the training set of the images of calibration_batches(…, count, batch_size, seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(train_size, generator=generator)[: count * batch_size]


def held_out_indices(train_size: int, count: int, exclude: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """`count` training-set indices of a seeded permutation, none of them in `exclude` (the
    calibration images): the held-out images the sensitivity allocation is measured on."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_size, generator=generator)
    taken = torch.zeros(train_size, dtype=torch.bool)
    taken[exclude] = True
    return order[~taken[order]][:count]


def calibration_batches(dataset: Dataset, count: int, batch_size: int, seed: int = 0):
    """`count` shuffled, unaugmented, normalized training batches (x, y) for taylor/chip."""
    order = calibration_indices(len(dataset.train_labels), count, batch_size, seed)
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
    check_at_least(("--cache-mb", config.cache_mb, 0),
                               ("--repair-batches", config.repair_batches, 0),
                               ("--finetune-epochs", config.finetune_epochs, 0),
                               ("batch_size", config.batch_size, 1),
                               ("eval_batch_size", config.eval_batch_size, 1),
                               ("calibration_batches", config.calibration_batches, 1))
    check_positive("--finetune-lr", config.finetune_lr)
    if config.repair_batches < 1 and any(m.needs_data for m in methods):
        raise IntraFusionError("--repair-batches must be at least 1 for the *_repair and *_reconstruct methods")
    for b in config.budgets:
        check_budget(config.budget_kind, b)
    for a in config.allocations:
        _check_choice(a, ALLOCATIONS, "allocation")
    if config.budgets and "sensitivity" in config.allocations and not config.held_out >= 1:
        raise IntraFusionError(f"--held-out must be at least 1 for the sensitivity allocation, got {config.held_out}")
    check_pool(config)


def open_checkpoint(config: GridConfig) -> tuple[dict, str]:
    """The configured checkpoint's contents and its sha256."""
    path = config.checkpoint_path()
    ensure_unzipped(path)
    return read_checkpoint(path, config.dataset), file_digest(path)


def prepare(config: GridConfig, checkpoint: tuple[dict, str] | None = None
            ) -> tuple[Dataset, tuple, Pruner, str, Callable[[], Pruner]]:
    """Load data and checkpoint (or use `checkpoint` from open_checkpoint); return the dataset,
    its normalized test tensors (images, labels), the folded base pruner, the checkpoint's
    sha256, and a function that folds and traces a new base from scratch (the naive path's
    per-cell work). The unpruned accuracy comes from the evaluator's first pass."""
    validate(config)
    state, digest = checkpoint or open_checkpoint(config)
    dataset = load_dataset(config.dataset, config.data_dir)
    model = model_from_state(config.model_name, dataset.num_classes, state["model_state_dict"],
                             config.checkpoint_path())
    device = torch.device(config.device)
    model.to(device).eval()
    test_x, test_y = dataset.test_tensors()
    original = copy.deepcopy(model)
    options = pruner_options(model)  # the Mixer's token layers, transformers' residual stream
    pruner = Pruner(model, test_x[:1].to(device), dataset.num_classes, **options)
    for index in group_list(pruner, config.group_idxs):
        for s in config.sparsities:
            pruner.check_prunable(index, s)
    rebuild = lambda: Pruner(copy.deepcopy(original), test_x[:1].to(device), dataset.num_classes, **options)  # noqa: E731
    return dataset, (test_x, test_y), pruner, digest, rebuild


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

    def __init__(self, config: GridConfig, log=tqdm.write, output: bool = True, pool=None):
        """`output=False` (a worker process, parallel.py): the output CSVs are neither checked
        nor read, and nothing is known to be done. `pool`: an open parallel.open_pool that
        computes the cells (None: this process does)."""
        validate(config)
        self.config, self.log = config, log
        self.paths = {c: config.output_path(c) for c in _unique(config.criteria)}
        for path in set(self.paths.values()) if output else ():
            check_writable(path)
        checkpoint = open_checkpoint(config)
        self.common = comparable_settings(config, checkpoint[1])
        self.previous = {path: previous_rows(path, self.common, config.resume, config.overwrite)
                         for path in _unique(self.paths.values()) if output}
        self.done = {cell_key(r): r for rows in self.previous.values() for r in rows}
        self.dataset, (test_x, test_y), self.base, _, rebuild = prepare(config, checkpoint)
        self.new_variant = self.base.copy if config.fast else rebuild
        if config.fast:  # a group is fused at several sparsities: its channel distances once
            self.base.distances = {}
        self.evaluator = GridEvaluator(self.base, test_x, test_y, config.fast, config.eval_batch_size)
        self._shards: dict[tuple[int, int], GridEvaluator] = {}
        self._base_accuracy: float | None = None  # the pool's, when workers evaluated the cells
        self.groups = _unique(config.group_idxs)
        self.example = test_x[:1].to(config.device)
        self.base_macs = count_macs_params(self.base.model, self.example)[0]
        self.results: dict[str, list[dict]] = {str(p): [] for p in self.previous}
        self.logs: dict = {}
        self._repair = None
        self._batches = None
        self._scorers: dict[str, Scorer] = {}
        self._cost = None
        self._group_bytes: dict[int, int] = {}
        self.unrecorded: set[str] = set()  # criteria whose 'none' row is still to be recorded
        self.pool = pool

    def cells(self) -> list[tuple]:
        """(criterion, group, sparsity, method, ""), or with budgets the budget cells over all
        groups (criterion, "all", budget, method, "<kind>:<allocation>")."""
        c = self.config
        if c.budgets:
            return [(crit, "all", b, m, f"{c.budget_kind}:{a}") for crit in self.paths
                    for b in _unique(c.budgets) for a in _unique(c.allocations) for m in _unique(c.methods)]
        return [(crit, g, s, m, "") for crit in self.paths for g in self.groups
                for s in _unique(c.sparsities) for m in _unique(c.methods)]

    def finished(self, cell: tuple) -> bool:
        """Whether the cell's row, and its fine-tuning rows, are all known."""
        epochs = [(cell[3], 0)] + [(cell[3] + FT, e) for e in range(1, self.config.finetune_epochs + 1)]
        return all((*cell[:3], m, e, cell[4]) in self.done for m, e in epochs)

    @property
    def base_accuracy(self) -> float:
        """The unpruned test accuracy: from the workers' passes, or from this evaluator's first."""
        return self._base_accuracy if self._base_accuracy is not None else self.evaluator.base_accuracy

    def evaluator_of(self, shard: tuple[int, int]) -> GridEvaluator:
        """The evaluator of the part `shard` (i, n) of the test set: the i-th of n runs of whole
        evaluation batches, whose correct counts add up to the whole's (a worker's part,
        parallel.worker_evaluate)."""
        if shard not in self._shards:
            e = self.evaluator
            part = shard_slice(len(e.labels), e.batch_size, *shard)
            self._shards[shard] = GridEvaluator(self.base, e.images[part], e.labels[part], self.config.fast,
                                                e.batch_size)
        return self._shards[shard]

    @property
    def shardable(self) -> bool:
        """Whether local workers may split the test set instead of the cells: plain cells
        (budget cells' profiles, repairs and fine-tuning are work better split by cells)."""
        return not self.config.budgets and not self.config.finetune_epochs

    def record(self, row: dict) -> dict:
        """Write a new row (a known cell keeps its earlier row); add it to the results. A
        criterion's 'none' row goes before its first other row (`record_unpruned`)."""
        if row["criterion"] in self.unrecorded:
            self.record_unpruned(row["criterion"])
        key = cell_key(row)
        path = self.paths[row["criterion"]]
        if key not in self.done:
            self.logs[path].write(row)
            self.done[key] = row
        self.results[str(path)].append(self.done[key])
        return self.done[key]

    def record_unpruned(self, criterion: str) -> None:
        """Record the criterion's 'none' row: an earlier run's, or a new one whose accuracy comes
        from the pass that evaluated the cells before it (a pass of its own only if none ran)."""
        self.unrecorded.discard(criterion)
        key = cell_key(dict(criterion=criterion, group=-1, sparsity=0.0, method="none"))
        if key not in self.done:
            self.log(f"{criterion:6s} unpruned: {100 * self.base_accuracy:6.2f}%")
        self.record(self.done.get(key) or self.row(criterion, -1, 0.0, "none", self.base.model,
                                                   self.base_accuracy))

    def replay(self, cell: tuple) -> None:
        """Add the known rows of a finished cell to the results, in epoch order."""
        for key in sorted(k for k in self.done if k[:3] == cell[:3] and k[3] in (cell[3], cell[3] + FT)
                          and k[5] == cell[4]):
            self.record(self.done[key])

    def repair_data(self):
        """(RepairInputs, unpruned reference statistics) for the *_repair methods, made once:
        every variant's repair reuses the unpruned activations before its first changed segment."""
        if self._repair is None:
            c = self.config
            batches = calibration_batches(self.dataset, c.repair_batches, c.batch_size, seed=1)
            batches = [(x.to(c.device), y) for x, y in batches]
            self._repair = (RepairInputs(self.base.model, batches), reference_statistics(self.base.model, batches))
        return self._repair

    def scorer(self, criterion: str) -> Scorer:
        """The Scorer of `criterion`, made once per run (it caches the unpruned network's Taylor
        gradients or CHIP scores), with the calibration batches (drawn once) when it needs data."""
        c = self.config
        if criterion not in self._scorers:
            if criterion in DATA_CRITERIA and self._batches is None:
                batches = calibration_batches(self.dataset, c.calibration_batches, c.batch_size)
                self._batches = [(x.to(c.device), y.to(c.device)) for x, y in batches]
            self._scorers[criterion] = Scorer(criterion, self._batches if criterion in DATA_CRITERIA else None,
                                              cache=c.fast)
        return self._scorers[criterion]

    def row(self, criterion, group, sparsity, method, model, accuracy_, seconds=0.0, **budget) -> dict:
        return dict(self.common, criterion=criterion, group=group, sparsity=sparsity, method=method,
                    accuracy=accuracy_, params=count_params(model), prune_seconds=round(seconds, 4),
                    macs=count_macs_params(model, self.example)[0], epoch=0, **budget)

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out training images (normalized) and labels of the sensitivity allocation:
        a seeded subset of the training set disjoint from the calibration and repair batches."""
        c, train = self.config, self.dataset.train_labels
        used = torch.cat([calibration_indices(len(train), c.calibration_batches, c.batch_size, seed=0),
                          calibration_indices(len(train), c.repair_batches, c.batch_size, seed=1)])
        index = held_out_indices(len(train), c.held_out, used)
        return self.dataset.normalize(self.dataset.train_images[index]).to(c.device), train[index].to(c.device)

    def apply(self, variant: Pruner, scorer: Scorer, method, plan: dict) -> None:
        """Prune `variant` with `method` at the {group: sparsity} plan, then repair and/or
        reconstruct if it does (on the repair batches)."""
        for g, sparsity in plan.items():
            variant.prune_group(g, sparsity, method.pruning, scorer, method.fusion(self.config.fusion))
        if method.repair:
            repair_pruned(self.base, variant, *self.repair_data())
        if method.reconstruct:
            reconstruct_pruned(self.base, variant, self.repair_data()[0])

    def budget_plan(self, scorer: Scorer, criterion: str, method, budget: float, allocation: str) -> dict:
        """The {group: sparsity} plan of `allocation` meeting the budget (profiles cached in
        config.profile_cache, default results/profiles.json)."""
        c = self.config
        if self._cost is None:
            self._cost = measure_cost_model(self.base, self.example)
        settings = dict(checkpoint_sha256=self.common["checkpoint_sha256"], model=c.model_name,
                        method=method.name, criterion=criterion, fusion=dataclasses.asdict(c.fusion),
                        repair_batches=c.repair_batches, calibration_batches=c.calibration_batches,
                        batch_size=c.batch_size)
        result = allocate(self.base, self.example, range(len(self.base.groups)), c.budget_kind, budget,
                          allocation, scorer=scorer, prune=lambda v, plan: self.apply(v, scorer, method, plan),
                          held_out=self.held_out() if allocation == "sensitivity" else None,
                          cache=c.profile_cache or Path("results") / "profiles.json",
                          cache_settings=settings, cost=self._cost)
        if result.profile_seconds:
            self.log(f"sensitivity profile of {method.name} ({criterion}): {result.profile_seconds:.0f} s "
                     f"({result.profile_cpu_seconds:.0f} CPU s, {torch.get_num_threads()} threads)")
        return result.plan

    def prune_cell(self, scorer: Scorer, cell: tuple) -> tuple[dict, Pruner]:
        """Prune a new variant for a cell (see `cells`); its row without the accuracy, and the
        variant, which on the fast path shares its unchanged tensors with the base."""
        criterion, group, value, name, allocation = cell
        method = get_method(name)
        variant = self.new_variant()
        scorer.generator.manual_seed(_cell_seed(group, value))
        start = time.perf_counter()
        if allocation:
            plan = self.budget_plan(scorer, criterion, method, value, allocation.split(":")[1])
        else:
            plan = dict.fromkeys(group_list(self.base, [group]), value)
        self.apply(variant, scorer, method, plan)
        seconds = time.perf_counter() - start
        budget = {}
        if allocation:
            widths = group_widths(self.base)
            pruned = sum(widths[g] - kept_count(widths[g], s) for g, s in plan.items())
            value = round(pruned / sum(widths), 6)
            budget = dict(budget=cell[2], budget_kind=self.config.budget_kind, allocation=allocation.split(":")[1],
                          sparsities=json.dumps({str(g): round(s, 6) for g, s in plan.items()}))
        if self.config.fast:
            share_unchanged(self.base.model, variant.model)
        return self.row(criterion, group, value, name, variant.model, None, seconds, **budget), variant

    def finetune_rows(self, variant: Pruner, row: dict) -> list[dict]:
        """Fine-tune the variant; a "+ft" row with the test accuracy after each epoch."""
        rows = []
        own_storage(self.base.model, variant.model)

        def on_epoch(epoch: int, model) -> None:
            rows.append(dict(row, method=row["method"] + FT, epoch=epoch,
                             accuracy=self.evaluator.accuracy(variant)))

        c = self.config
        finetune(variant.model, self.dataset, c.finetune_epochs, c.finetune_lr, c.batch_size,
                 device=torch.device(c.device), on_epoch=on_epoch)
        return rows

    def compute(self, cells: list[tuple], evaluate=None) -> list[dict]:
        """The rows of `cells` (see `cells`), each followed by its fine-tuning rows, in cell
        order; nothing is written. The one place where cells are computed: the serial driver
        calls it on chunks of pending cells, a worker process on the cells it is sent. All cells
        are pruned first, then evaluated together in one pass over the test set, by this
        process's evaluator or by `evaluate` (variants -> accuracies: the workers' shards)."""
        pruned = [self.prune_cell(self.scorer(cell[0]), cell) for cell in cells]
        accuracies = (evaluate or self.evaluator.evaluate)([variant for _, variant in pruned])
        rows = []
        for accuracy_ in accuracies:
            row, variant = pruned.pop(0)  # let go once done: a fine-tuned variant owns all its tensors
            rows.append(dict(row, accuracy=accuracy_))
            if self.config.finetune_epochs:
                rows.extend(self.finetune_rows(variant, rows[-1]))
        return rows

    def variant_bytes(self, cell: tuple) -> int:
        """At most the bytes a cell's variant holds apart from the base on the fast path: the
        tensors of the modules its groups change (every group for a budget cell)."""
        groups = range(len(self.base.groups)) if cell[4] else group_list(self.base, [cell[1]])
        for g in groups:
            if g not in self._group_bytes:
                self._group_bytes[g] = sum(t.numel() * t.element_size() for n in self.base.changed_modules(g)
                                           for t in self.base.model.get_submodule(n).state_dict().values())
        return sum(self._group_bytes[g] for g in groups)

    def chunks(self, cells: list[tuple]) -> list[list[tuple]]:
        """How pending cells are handed to `compute`: whole lines of the log (the methods of one
        group and sparsity, or of one budget and allocation), on the fast path as many as fit
        `cache_mb` MiB of variants (`variant_bytes`), since each chunk is one pass over the test
        set that runs the unpruned network once; one line per chunk on the naive path."""
        lines = [list(c) for _, c in itertools.groupby(cells, key=lambda c: (*c[:3], c[4]))]
        if not self.config.fast:
            return lines
        chunks, used = [], 0
        for line in lines:
            size = sum(map(self.variant_bytes, line))
            if chunks and used + size <= self.config.cache_mb * 2 ** 20:
                chunks[-1] += line
                used += size
            else:
                chunks.append(line)
                used = size
        return chunks

    def run_criterion(self, criterion: str, bar) -> None:
        """Every cell of one criterion: the pending cells chunk by chunk, computed here or by the
        pool's workers (in the order they finish), each chunk's rows recorded as soon as it is
        computed (after the unpruned row, whose accuracy comes from the same pass), one log line
        per chunk. Local workers split the test set of every chunk among them when the cells
        allow it (`shardable`), so the unpruned network runs once per image as in a serial run;
        otherwise, and on Ray, each worker computes a part of the cells."""
        self.unrecorded.add(criterion)
        cells = [c for c in self.cells() if c[0] == criterion]
        for cell in cells:
            if self.finished(cell):
                self.replay(cell)
        pending = [c for c in cells if not self.finished(c)]
        shards = 1
        if self.pool and self.shardable:  # a shard is at least one evaluation batch
            shards = min(self.pool.shards, -(-len(self.evaluator.labels) // self.evaluator.batch_size))
        if self.pool and pending:
            self.log(f"{criterion:6s} {len(pending)} cells: " + (
                "pruned here, each worker evaluates them all on its part of the test set" if shards > 1
                else "each worker computes its part of them"))
        if shards > 1:
            def evaluate(variants):
                accuracies, self._base_accuracy = self.pool.evaluate(self.base.model, variants, shards)
                return accuracies
            computed = ((c, self.compute(c, evaluate), None) for c in self.chunks(pending))
        elif self.pool:
            parts = split_lines(pending, self.pool.parallelism)
            computed = self.pool.results([c for part in parts for c in self.chunks(part)])
        else:
            computed = ((c, self.compute(c), None) for c in self.chunks(pending))
        for chunk, rows, base_accuracy in computed:
            if self._base_accuracy is None:
                self._base_accuracy = base_accuracy
            for row in rows:
                self.record(row)
            bar.update(len(chunk))
            self.log_chunk(chunk, [r for r in rows if not r["epoch"]])

    def log_chunk(self, chunk: list[tuple], rows: list[dict]) -> None:
        """One log line per group and sparsity (or budget and allocation) of a computed chunk."""
        for (criterion, group, value, _, allocation), line in itertools.groupby(
                zip(chunk, rows), key=lambda cr: (*cr[0][:3], None, cr[0][4])):
            text = "  ".join(f"{cell[3]} {100 * row['accuracy']:6.2f}%"
                             + (f" ({100 * row['macs'] / self.base_macs:.1f}% MACs)" if allocation else "")
                             for cell, row in line)
            what = f"{allocation} {value:.2f}" if allocation else f"group {group!s:>2} sparsity {value:.2f}"
            self.log(f"{criterion:6s} {what}: {text}")

    def run(self, progress: bool = False) -> dict[str, list[dict]]:
        cells = self.cells()
        finished = sum(map(self.finished, cells))
        self.log(f"{self.config.model_name} on {self.config.dataset}: {len(self.base.groups)} groups"
                 + (f"; resuming, {finished} of {len(cells)} cells done" if finished else ""))
        with ExitStack() as stack:
            self.logs = {p: stack.enter_context(CsvLog(p, fresh=not self.previous[p]))
                         for p in self.previous}
            bar = stack.enter_context(tqdm(total=len(cells), initial=finished, disable=not progress,
                                           desc="grid", unit="cell"))
            for criterion in self.paths:
                self.run_criterion(criterion, bar)
        for criterion, path in self.paths.items():
            for table in result_tables(self.results[str(path)], criterion):
                self.log(table)
        for path in self.results:
            self.log(f"wrote {path}")
        return self.results


def run_grid(config: GridConfig, log=tqdm.write, progress: bool = False) -> dict[str, list[dict]]:
    """Run every criterion × group × sparsity × method cell not yet in its output CSV; return
    the grid's rows (earlier and new) per output file. `progress` shows a bar on stderr. The
    pool of `--workers` or `--ray-address` opens first: a Ray cluster is reached before anything
    is loaded, and local workers load their copies while this process loads its own."""
    validate(config)
    with open_pool(config, load_run, log) as pool:
        return GridRun(config, log, pool=pool).run(progress)


def load_run(config: GridConfig) -> GridRun:
    """A worker's GridRun of `config` (parallel.worker_load): computes, writes nothing."""
    return GridRun(config, output=False)
