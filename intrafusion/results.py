"""Result CSVs: the column order and an append-only writer that never leaves a half row."""
from __future__ import annotations

import csv
import os
from pathlib import Path

CSV_COLUMNS = ["model", "dataset", "criterion", "group", "sparsity", "method", "accuracy", "params",
               "prune_seconds", "fusion_rule", "target", "source_prob", "target_prob", "p",
               "checkpoint_sha256"]


class CsvLog:
    """Appends rows to a CSV, each flushed and fsynced at once, so a crash loses no finished row."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if fresh:
            self.writer.writeheader()
            self._sync()

    def _sync(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self._sync()

    def close(self):
        self.file.close()
