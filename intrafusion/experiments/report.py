"""The tables printed at the end of a grid run.

`summary_table`: group × sparsity rows, one accuracy column per method, the gain of Intra-Fusion
over default pruning (percentage points) and, with more than two methods, the best one.
`finetune_table`: per (group, sparsity, method), the accuracy before and after each fine-tuning
epoch ("+ft" rows). A language model's rows score the test perplexity instead (`PERPLEXITY`:
lower is better, so the best is the least and the gain is how much lower Intra-Fusion's is)."""
from __future__ import annotations

from dataclasses import dataclass

FT = "+ft"


@dataclass(frozen=True)
class Metric:
    """What the rows of a results CSV score: its column, the label of a plot's axis, the factor
    and unit it is shown in, and whether lower is better."""

    column: str
    label: str
    scale: float
    unit: str
    lower_is_better: bool

    def value(self, row: dict) -> float:
        """The row's score as shown (accuracy in %, perplexity as it is)."""
        return self.scale * row[self.column]

    def text(self, value: float | None) -> str:
        """A raw score (fraction, perplexity) as the tables print it; "-" for None."""
        return f"{self.scale * value:.2f}{self.unit}" if value is not None else "-"

    def best(self, values):
        return min(values) if self.lower_is_better else max(values)

    def gain(self, default: float, fused: float) -> float:
        """How much better `fused` is than `default`, in shown units (positive: better)."""
        return self.scale * (default - fused if self.lower_is_better else fused - default)


ACCURACY = Metric("accuracy", "test accuracy (%)", 100.0, "%", False)
PERPLEXITY = Metric("perplexity", "test perplexity, lower is better", 1.0, "", True)


def metric_of(columns) -> Metric:
    """The Metric of a CSV with these columns (a header, or a row's keys)."""
    return PERPLEXITY if "perplexity" in columns else ACCURACY


def base_method(method: str) -> str:
    """The pruning method of a row: "intra_fusion+ft" -> "intra_fusion"."""
    return method.removesuffix(FT)


def cells_in_order(keys) -> list[tuple]:
    """(group, sparsity) pairs, groups in order of first appearance, sparsities ascending."""
    keys = list(dict.fromkeys(keys))
    groups = list(dict.fromkeys(g for g, _ in keys))
    return sorted(keys, key=lambda k: (groups.index(k[0]), k[1]))


def _percent(value: float | None) -> str:
    return ACCURACY.text(value)


def _title(rows: list[dict], heading: str, metric: Metric = ACCURACY) -> str:
    base = next((r[metric.column] for r in rows if r["method"] == "none"), None)
    return f"{heading}: unpruned {metric.text(base)}" if base is not None else heading


def _render(title: str, header: list[str], body: list[list[str]], left: int | None) -> str:
    """The title, then columns as wide as their widest cell, right-aligned but column `left`."""
    widths = [max(len(c) for c in column) for column in zip(header, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([title, line(header)] + [line(cells) for cells in body])


def summary_table(rows: list[dict], criterion: str, metric: Metric = ACCURACY) -> str:
    """Table of the rows (typed result rows) of one criterion without fine-tuning; the 'none' row
    gives the header. `best` names the best-scoring method(s) of a row (the most accurate, or
    the least perplexity), ties joined by '='."""
    rows = [r for r in rows if r["criterion"] == criterion]
    pruned = [r for r in rows if r["method"] != "none" and not r["method"].endswith(FT)]
    methods = list(dict.fromkeys(r["method"] for r in pruned))
    cells = {(r["group"], r["sparsity"], r["method"]): r[metric.column] for r in pruned}
    with_gain = {"default", "intra_fusion"} <= set(methods)
    with_best = len(methods) > 2
    header = ["group", "sparsity"] + [m.rjust(7) for m in methods]
    header += ["gain".rjust(7)] * with_gain + ["best"] * with_best
    body = []
    for group, sparsity in cells_in_order((r["group"], r["sparsity"]) for r in pruned):
        values = {m: cells.get((group, sparsity, m)) for m in methods}
        line = [str(group).rjust(5), f"{sparsity:8.2f}"] + [metric.text(v) for v in values.values()]
        if with_gain:
            d, f = values["default"], values["intra_fusion"]
            line.append(f"{metric.gain(d, f):+.2f}" if d is not None and f is not None else "-")
        if with_best:
            scored = [v for v in values.values() if v is not None]
            top = metric.best(scored) if scored else None
            line.append("=".join(m for m, v in values.items() if v == top) if top is not None else "-")
        body.append(line)
    return _render(_title(rows, criterion, metric), header, body, left=len(header) - 1 if with_best else None)


def finetune_table(rows: list[dict], criterion: str) -> str | None:
    """Accuracy per (group, sparsity, method) before fine-tuning (epoch 0: the method's own row)
    and after each epoch 1..N of its "+ft" rows; None when the criterion has no "+ft" row."""
    rows = [r for r in rows if r["criterion"] == criterion]
    tuned = [r for r in rows if r["method"].endswith(FT)]
    if not tuned:
        return None
    epochs = range(max(r["epoch"] for r in tuned) + 1)
    acc = {(r["group"], r["sparsity"], r["method"], r.get("epoch") or 0): r["accuracy"] for r in rows}
    methods = list(dict.fromkeys(base_method(r["method"]) for r in tuned))
    present = {(r["group"], r["sparsity"], base_method(r["method"])) for r in tuned}
    header = ["group", "sparsity", "method"] + [f"epoch {e}" for e in epochs]
    body = []
    for group, sparsity in cells_in_order((r["group"], r["sparsity"]) for r in tuned):
        for m in methods:
            if (group, sparsity, m) in present:
                body.append([str(group).rjust(5), f"{sparsity:8.2f}", m]
                            + [_percent(acc.get((group, sparsity, m + FT if e else m, e)))
                               for e in epochs])
    return _render(_title(rows, f"{criterion} fine-tuning"), header, body, left=2)


def budget_table(rows: list[dict], criterion: str, metric: Metric = ACCURACY) -> str | None:
    """Per (budget, allocation) of the budget rows of one criterion, without fine-tuning: each
    method's score and the MACs it kept (% of the unpruned row's; a language model's rows: the
    parameters and MACs of its decoder blocks); None without budget rows."""
    rows = [r for r in rows if r["criterion"] == criterion]
    cells = [r for r in rows if r.get("allocation") and not r["method"].endswith(FT)]
    if not cells:
        return None
    costs = ("block_params", "block_macs") if "block_macs" in cells[0] else ("macs",)
    unpruned = next((r for r in rows if r["method"] == "none"), None)
    methods = list(dict.fromkeys(r["method"] for r in cells))
    found = {(r["budget_kind"], r["budget"], r["allocation"], r["method"]): r for r in cells}
    keys = sorted(dict.fromkeys(k[:3] for k in found), key=lambda k: (k[0], -k[1]))
    body = []
    for kind, budget, allocation in keys:
        line = [f"{kind} {budget:.2f}", allocation]
        for m in methods:
            r = found.get((kind, budget, allocation, m))
            kept = " / ".join(f"{100 * r[c] / unpruned[c]:.1f}%" for c in costs) if r and unpruned else ""
            line.append("-" if r is None else metric.text(r[metric.column]) + (f" ({kept})" if kept else ""))
        body.append(line)
    kept = "block parameters / MACs kept" if len(costs) == 2 else "MACs kept"
    return _render(_title(rows, f"{criterion} budgets ({metric.column}, {kept})", metric),
                   ["budget", "allocation"] + methods, body, left=1)


def result_tables(rows: list[dict], criterion: str, metric: Metric = ACCURACY) -> list[str]:
    """The tables a finished grid prints for one criterion's rows: the per-group summary (if any
    cell has no allocation), the budgets and the fine-tuning recovery (those that apply)."""
    tables = []
    if any(not r.get("allocation") and r["method"] != "none" for r in rows):
        tables.append(summary_table([r for r in rows if not r.get("allocation")], criterion, metric))
    tables.append(budget_table(rows, criterion, metric))
    if metric is ACCURACY:
        tables.append(finetune_table(rows, criterion))
    return [t for t in tables if t is not None]
