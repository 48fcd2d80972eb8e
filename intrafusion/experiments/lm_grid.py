"""The grid for a language model (main.py --model-name llama_gqa --dataset python-stdlib): every
criterion × group × sparsity × method cell, or budget × allocation × method cell over all groups,
pruned by intrafusion.compress and scored by its test perplexity (lower is better).

A chunk of cells (whole lines of the log, within --cache-mb of variants) is pruned first, then
evaluated in one pass over the test windows by the data-major evaluator (lm_data.PerplexityEvaluator):
the unpruned model runs once per batch for all variants of the chunk, each from its first changed
decoder layer on, and gives the unpruned row from the same pass. Each chunk's rows are appended to
the CSV (results.LM_CSV_COLUMNS) as soon as they are known; a rerun skips cells already in it, as
long as they were computed with the same checkpoint, corpus split, calibration and fusion
settings. No fine-tuning and no worker processes: the model is small, and its cells are pruned in
seconds (a sensitivity profile in minutes).

Data (lm_data.py): --repair-batches batches of calibration windows of the train split for the
repair and reconstruct methods and taylor; --held-out windows of the held-out split for the
sensitivity allocation; the test split for the perplexities only.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import corpus as corpus_lib
from .lm_data import (EVAL_BATCH, PerplexityEvaluator, calibration_windows,
                      check_pairing, held_out_windows, lm_costs, open_language_model, unit_widths)
from .report import PERPLEXITY, result_tables
from .results import LM_CSV_COLUMNS, CsvLog, cell_key, previous_rows
from ..allocation import check_budget
from ..decoder import LM_ALLOCATIONS, LM_CRITERIA, DecoderPruner
from ..errors import IntraFusionError, check_at_least
from ..evaluator import share_unchanged
from ..groups import FusionSettings, check_sparsity
from ..methods import get_method
from ..storage import check_writable


@dataclass
class LMGridConfig:
    """The settings of a language model's grid (main.py's flags; field names as GridConfig's)."""

    model_name: str = "llama_gqa"
    dataset: str = corpus_lib.DATASET
    checkpoint: Path | None = None      # default models/python-stdlib/<model>/
    corpus_root: Path | None = None     # default this Python's standard library
    group_idxs: tuple = (0, 1)
    sparsities: tuple = (0.25, 0.5)
    criteria: tuple = ("l1",)
    methods: tuple = ("default", "intra_fusion")
    fusion: FusionSettings = field(default_factory=FusionSettings)
    device: str = "cpu"
    repair_batches: int = 10            # calibration batches of CALIBRATION_WINDOWS training windows
    budgets: tuple = ()                 # fractions of the blocks' cost to keep: budget cells over all groups
    budget_kind: str = "params"
    allocations: tuple = ("uniform",)
    held_out: int = 1000                # held-out windows for the sensitivity allocation (at most all)
    out: Path | None = None
    resume: bool | None = None
    overwrite: bool = False
    fast: bool = True                   # False: every variant and the unpruned model in passes of their own
    cache_mb: float = 2048              # bound of the variants evaluated together (chunks)
    eval_batch_size: int = EVAL_BATCH
    finetune_epochs: int = 0            # fixed: language models are not fine-tuned here
    finetune_lr: float = 0.0

    def output_path(self, criterion: str) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path("results") / f"{self.model_name}_{self.dataset}_{criterion}.csv"


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def validate_lm_grid(config: LMGridConfig) -> None:
    """Reject settings that cannot work before anything is loaded or written (group ranges and
    widths are checked against the model in LMGridRun)."""
    check_pairing(config.model_name, config.dataset)
    if not config.group_idxs and not config.budgets:
        raise IntraFusionError("no group given: pass at least one index to --group_idxs")
    for s in config.sparsities:
        check_sparsity(s)
    for values, choices, what in ((config.criteria, LM_CRITERIA, "criterion"),
                                  (config.allocations, LM_ALLOCATIONS, "allocation")):
        for v in values:
            if v not in choices:
                raise IntraFusionError(f"{what} {v!r} is not available for language models; choose one "
                                       f"of {', '.join(choices)}")
    methods = [get_method(m) for m in config.methods]
    for g in config.group_idxs:
        if g != "all" and not isinstance(g, int):
            raise IntraFusionError(f"group {g!r} is neither an index nor 'all'")
    check_at_least(("--repair-batches", config.repair_batches, 0), ("--cache-mb", config.cache_mb, 0),
                   ("--held-out", config.held_out, 1), ("eval_batch_size", config.eval_batch_size, 1))
    needs = [m.name for m in methods if m.needs_data] + [c for c in config.criteria if c == "taylor"]
    if needs and config.repair_batches < 1:
        raise IntraFusionError(f"{needs[0]} needs calibration data: --repair-batches must be at least 1")
    if not config.budgets and not config.sparsities:
        raise IntraFusionError("no sparsity given: pass at least one value to --sparsities")
    for b in config.budgets:
        check_budget(config.budget_kind, b)


class LMGridRun:
    """One run of a language model's grid: the model, its windows and evaluator, the rows already
    known (earlier runs' and this one's) and the CSV writers."""

    def __init__(self, config: LMGridConfig, log=tqdm.write):
        validate_lm_grid(config)
        self.config, self.log = config, log
        self.paths = {c: config.output_path(c) for c in _unique(config.criteria)}
        for path in set(self.paths.values()):
            check_writable(path)
        self.lm = open_language_model(config.model_name, config.checkpoint, config.corpus_root)
        f = config.fusion
        self.common = dict(model=config.model_name, dataset=config.dataset, checkpoint_sha256=self.lm.digest,
                           fusion_rule=f.rule, target=f.target, source_prob=f.source_prob,
                           target_prob=f.target_prob, p=f.p, repair_batches=config.repair_batches,
                           finetune_epochs=0, finetune_lr=0.0)
        self.previous = {path: previous_rows(path, self.common, config.resume, config.overwrite, LM_CSV_COLUMNS)
                         for path in _unique(self.paths.values())}
        self.done = {cell_key(r): r for rows in self.previous.values() for r in rows}
        device = torch.device(config.device)
        self.model = self.lm.model.to(device)
        self.pruner = DecoderPruner(self.model)
        self.groups = [] if config.budgets else _unique(config.group_idxs)
        for g in self.groups:
            for index in self.group_list(g):
                for s in config.sparsities:
                    self.pruner.check_prunable(index, s)
        train = self.lm.tokens("train")
        self.example = train[None, :self.lm.context].to(device)
        self.calibration = [w.to(device) for w in calibration_windows(train, config.repair_batches, self.lm.context)]
        self._held_out = None
        windows = corpus_lib.eval_windows(self.lm.tokens("test"), self.lm.context)
        self.evaluator = PerplexityEvaluator(self.model, [w.to(device) for w in windows], config.fast,
                                             config.eval_batch_size)
        self.base_costs = lm_costs(self.model, self.lm.context)
        self.results: dict[str, list[dict]] = {str(p): [] for p in self.previous}
        self.logs: dict = {}
        self.unrecorded: set[str] = set()

    def group_list(self, group) -> list[int]:
        """The group indices a cell's group names: itself, or every group for "all"."""
        return list(range(len(self.pruner.groups))) if group == "all" else [self.pruner.check_group(group).index]

    def cells(self) -> list[tuple]:
        """(criterion, group, sparsity, method, ""), or with budgets the budget cells over all
        groups (criterion, "all", budget, method, "<kind>:<allocation>"), as the CNN grid's."""
        c = self.config
        if c.budgets:
            return [(crit, "all", b, m, f"{c.budget_kind}:{a}") for crit in self.paths
                    for b in _unique(c.budgets) for a in _unique(c.allocations) for m in _unique(c.methods)]
        return [(crit, g, s, m, "") for crit in self.paths for g in self.groups
                for s in _unique(c.sparsities) for m in _unique(c.methods)]

    def held_out(self) -> torch.Tensor:
        """The held-out windows (N, context + 1) of the sensitivity allocation, read once."""
        if self._held_out is None:
            self._held_out = held_out_windows(self.lm.tokens("heldout"), self.config.held_out,
                                              self.lm.context).to(self.example.device)
        return self._held_out

    def prune_cell(self, cell: tuple) -> tuple[dict, torch.nn.Module]:
        """A compressed copy of the model for a cell (see `cells`) and its row without the
        perplexity; on the fast path the copy shares its unchanged tensors with the model."""
        from ..api import compress
        criterion, group, value, name, allocation = cell
        options = dict(method=name, criterion=criterion, calibration=self.calibration or None,
                       **dataclasses.asdict(self.config.fusion))
        kind, how = allocation.split(":") if allocation else ("sparsity", "uniform")
        start = time.perf_counter()
        small = compress(self.model, self.example, **{kind: value}, allocation=how,
                         groups=None if allocation else self.group_list(group),
                         held_out=self.held_out() if how == "sensitivity" else None, **options)
        seconds = time.perf_counter() - start
        row = dict(self.common, criterion=criterion, group=group, sparsity=value, method=name,
                   prune_seconds=round(seconds, 4), epoch=0, **lm_costs(small, self.lm.context))
        if allocation:  # sparsity: the fraction of all units pruned; sparsities: the plan
            before, after = unit_widths(self.model), unit_widths(small)
            plan = {str(g): round(1 - k / n, 6) for g, (n, k) in enumerate(zip(before, after))}
            row.update(sparsity=round(1 - sum(after) / sum(before), 6), budget=value, budget_kind=kind,
                       allocation=how, sparsities=json.dumps(plan))
        if self.config.fast:
            share_unchanged(self.model, small)
        return row, small

    def variant_bytes(self) -> int:
        """At most the bytes a variant holds apart from the model: its decoder blocks' tensors."""
        return sum(t.numel() * t.element_size() for b in self.pruner.blocks
                   for t in self.model.get_submodule(b.name).state_dict().values())

    def chunks(self, cells: list[tuple]) -> list[list[tuple]]:
        """Whole lines of the log (the methods of one group and sparsity, or of one budget and
        allocation), as many per chunk as fit --cache-mb (one line per chunk on the naive path)."""
        lines = [list(c) for _, c in itertools.groupby(cells, key=lambda c: (*c[:3], c[4]))]
        if not self.config.fast:
            return lines
        per_chunk = max(1, int(self.config.cache_mb * 2 ** 20 // self.variant_bytes()))
        chunks: list[list[tuple]] = []
        for line in lines:
            if chunks and len(chunks[-1]) + len(line) <= per_chunk:
                chunks[-1] += line
            else:
                chunks.append(line)
        return chunks

    def record(self, row: dict) -> None:
        """Write a new row (a known cell keeps its earlier row) after the criterion's 'none' row."""
        criterion = row["criterion"]
        if criterion in self.unrecorded:
            self.unrecorded.discard(criterion)
            key = cell_key(dict(criterion=criterion, group=-1, sparsity=0.0, method="none"))
            if key not in self.done:
                self.log(f"{criterion:6s} unpruned: test perplexity {self.evaluator.unpruned():.3f}")
            self.record(self.done.get(key) or dict(self.common, criterion=criterion, group=-1, sparsity=0.0,
                                                   method="none", perplexity=self.evaluator.unpruned(),
                                                   prune_seconds=0.0, epoch=0, **self.base_costs))
        key = cell_key(row)
        path = self.paths[criterion]
        if key not in self.done:
            self.logs[path].write(row)
            self.done[key] = row
        self.results[str(path)].append(self.done[key])

    def run_criterion(self, criterion: str, bar) -> None:
        """Every cell of one criterion: known cells replayed, pending ones chunk by chunk, each
        chunk pruned, then evaluated in one pass, its rows recorded at once."""
        self.unrecorded.add(criterion)
        cells = [c for c in self.cells() if c[0] == criterion]
        for cell in cells:
            key = (*cell[:4], 0, cell[4])
            if key in self.done:
                self.record(self.done[key])
        for chunk in self.chunks([c for c in cells if (*c[:4], 0, c[4]) not in self.done]):
            pruned = [self.prune_cell(cell) for cell in chunk]
            perplexities = self.evaluator.perplexities([model for _, model in pruned])
            rows = [dict(row, perplexity=ppl) for (row, _), ppl in zip(pruned, perplexities)]
            for row in rows:
                self.record(row)
            bar.update(len(chunk))
            for (_, group, value, _, allocation), line in itertools.groupby(
                    zip(chunk, rows), key=lambda cr: (*cr[0][:3], None, cr[0][4])):
                what = f"{allocation} {value:.2f}" if allocation else f"group {group!s:>2} sparsity {value:.2f}"
                self.log(f"{criterion:6s} {what}: " + "  ".join(
                    f"{cell[3]} {row['perplexity']:.3f} ({100 * row['block_params'] / self.base_costs['block_params']:.1f}% "
                    "block params)" for cell, row in line))

    def run(self, progress: bool = False) -> dict[str, list[dict]]:
        with warnings.catch_warnings():  # nothing is saved; the heads' notice once
            warnings.filterwarnings("ignore", message=".*cannot describe its widths")
            warnings.filterwarnings("once", message="intra_fusion: attention heads")
            return self._run(progress)

    def _run(self, progress: bool) -> dict[str, list[dict]]:
        cells = self.cells()
        finished = sum((*c[:4], 0, c[4]) in self.done for c in cells)
        self.log(f"{self.config.model_name} on {self.config.dataset}: {len(self.pruner.groups)} groups, "
                 f"test split {self.evaluator.tokens:,} tokens"
                 + (f"; resuming, {finished} of {len(cells)} cells done" if finished else ""))
        with ExitStack() as stack:
            self.logs = {p: stack.enter_context(CsvLog(p, fresh=not self.previous[p], columns=LM_CSV_COLUMNS))
                         for p in self.previous}
            bar = stack.enter_context(tqdm(total=len(cells), initial=finished, disable=not progress,
                                           desc="grid", unit="cell"))
            for criterion in self.paths:
                self.run_criterion(criterion, bar)
        for criterion, path in self.paths.items():
            for table in result_tables(self.results[str(path)], criterion, PERPLEXITY):
                self.log(table)
        for path in self.results:
            self.log(f"wrote {path}")
        return self.results


def run_lm_grid(config: LMGridConfig, log=tqdm.write, progress: bool = False) -> dict[str, list[dict]]:
    """Run every cell of a language model's grid not yet in its output CSV; return the rows
    (earlier and new) per output file."""
    return LMGridRun(config, log).run(progress)
