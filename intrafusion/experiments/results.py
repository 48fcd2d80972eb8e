"""Result CSVs: the column order, resuming from the rows of an earlier run, and an append-only
writer that never leaves a half row.

A row belongs to the grid cell (criterion, group, sparsity, method, fine-tuning epoch), or, for a
budget cell, (criterion, group, budget, method, epoch, budget kind and allocation); a budget row's
`sparsity` is the fraction of all channels pruned and `sparsities` its plan as JSON {group: s}. A run continues a CSV only
when every earlier row was computed with the same COMPARABLE settings; a row killed mid-write
(no final newline) is ignored on reading and cut off before appending.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..errors import IntraFusionError
from ..storage import write_failure

CSV_COLUMNS = ["model", "dataset", "criterion", "group", "sparsity", "method", "accuracy", "params",
               "prune_seconds", "fusion_rule", "target", "source_prob", "target_prob", "p",
               "checkpoint_sha256", "macs", "epoch", "repair_batches", "finetune_epochs",
               "finetune_lr", "budget", "budget_kind", "allocation", "sparsities"]
LM_CSV_COLUMNS = [("perplexity" if c == "accuracy" else c) for c in CSV_COLUMNS] + ["block_params",
                                                                                   "block_macs"]
COMPARABLE = ("model", "dataset", "checkpoint_sha256", "fusion_rule", "target", "source_prob",
              "target_prob", "p", "repair_batches", "finetune_epochs", "finetune_lr")


def group_value(value):
    """A group column value: an int index, or "all" for whole-network pruning."""
    return value if value == "all" else int(value)


def optional_float(value):
    """A budget column value: a float, or "" for a row that is not a budget cell."""
    return float(value) if value != "" else ""


_TYPES = {"group": group_value, "sparsity": float, "budget": optional_float, "accuracy": float, "params": int,
          "prune_seconds": float, "p": float, "macs": int, "epoch": int,
          "repair_batches": int, "finetune_epochs": int, "finetune_lr": float,
          "perplexity": float, "block_params": int, "block_macs": int}
_RESUME_HINT = "rerun the same command to resume"


def cell_key(row: dict) -> tuple:
    """The grid cell of a row: (criterion, group, sparsity, method, fine-tuning epoch, ""), or for
    a budget cell (criterion, group, budget, method, epoch, "<budget kind>:<allocation>")."""
    budget = row.get("allocation") and f"{row['budget_kind']}:{row['allocation']}"
    value = row["budget"] if budget else row["sparsity"]
    return (row["criterion"], group_value(row["group"]), float(value), row["method"],
            int(row.get("epoch") or 0), budget or "")


def _line(values) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue().encode()


def _complete_bytes(path: Path) -> bytes:
    """The file's bytes up to its last newline: a line cut by a kill is not a row."""
    data = Path(path).read_bytes()
    return data[: data.rfind(b"\n") + 1]


def _records(path: Path) -> list[list[str]]:
    """The complete lines of a CSV, split into fields."""
    try:
        text = _complete_bytes(path).decode("utf-8", errors="replace")
    except OSError as exc:
        raise IntraFusionError(f"cannot read {path} ({exc.strerror})") from None
    return list(csv.reader(io.StringIO(text)))


def _typed(header: list[str], records: list[list[str]], path: Path) -> list[dict]:
    """Rows as dicts, numeric columns converted (line numbers in errors count the header)."""
    rows = []
    for line, values in enumerate(records, start=2):
        if len(values) != len(header):
            raise IntraFusionError(f"{path} line {line} has {len(values)} fields, the header "
                            f"{len(header)}; fix or delete that line")
        try:
            rows.append({k: _TYPES[k](v) if k in _TYPES else v for k, v in zip(header, values)})
        except ValueError:
            raise IntraFusionError(f"{path} line {line} is not a result row; fix or delete that line") from None
    return rows


def read_table(path: Path | str) -> tuple[list[str] | None, list[dict]]:
    """Header (None for a file without a complete line) and typed rows of a results CSV."""
    path = Path(path)
    records = _records(path)
    if not records:
        return None, []
    return records[0], _typed(records[0], records[1:], path)


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 16 else text[:12] + "…"


def previous_rows(path: Path | str, settings: dict, resume: bool | None = None,
                  overwrite: bool = False, columns: list[str] = CSV_COLUMNS) -> list[dict]:
    """The rows of `path` (a CSV of `columns`) that a run with `settings` (the COMPARABLE
    values) continues from.

    [] when there is nothing to continue or `overwrite` is set. resume=None continues a CSV of
    this version's columns; resume=False refuses one that holds rows. Refuses, naming the first
    differing setting, rows that were computed with other settings."""
    path = Path(path)
    if overwrite or not path.is_file():
        return []
    records = _records(path)
    if not records:
        return []
    if records[0] != columns:
        raise IntraFusionError(f"{path} exists but is not a results CSV of this version (other columns); "
                        "pass --overwrite to replace it or choose another --out")
    rows = _typed(columns, records[1:], path)
    if rows and resume is False:
        raise IntraFusionError(f"{path} already holds {len(rows)} result rows; rerun with --resume to "
                        "continue it or --overwrite to replace it")
    for row in rows:
        for column in COMPARABLE:
            if row[column] != settings[column]:
                raise IntraFusionError(
                    f"{path} holds rows computed with {column}={_short(row[column])} but this run "
                    f"has {column}={_short(settings[column])}, so they are not comparable; pass "
                    "--overwrite to replace them or choose another --out")
    return rows


class CsvLog:
    """Appends rows to a results CSV, each as a single write that is fsynced at once, so a crash
    loses no finished row; a write that fails (disk full) is cut back off and raises IntraFusionError.

    fresh=True starts the file over; otherwise a partial last line is removed before appending.
    columns: CSV_COLUMNS, or LM_CSV_COLUMNS for a language model's grid."""

    def __init__(self, path: Path | str, fresh: bool = False, columns: list[str] = CSV_COLUMNS):
        self.path, self.columns = Path(path), columns
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0)
            self.fd = os.open(self.path, flags, 0o644)
            os.ftruncate(self.fd, len(_complete_bytes(self.path)))
        except OSError as exc:
            raise write_failure(self.path, exc, _RESUME_HINT) from None
        if os.fstat(self.fd).st_size == 0:
            self._append(_line(columns))

    def _append(self, data: bytes) -> None:
        start = os.fstat(self.fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except BaseException as exc:
            if view or isinstance(exc, OSError):  # a half row, or one the disk may not hold
                os.ftruncate(self.fd, start)
            if isinstance(exc, OSError):
                raise write_failure(self.path, exc, _RESUME_HINT) from None
            raise

    def write(self, row: dict) -> None:
        self._append(_line([row.get(c, "") for c in self.columns]))

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "CsvLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
