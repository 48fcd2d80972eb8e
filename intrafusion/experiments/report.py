"""The tables printed at the end of a grid run.

`summary_table`: group × sparsity rows, one accuracy column per method, the gain of Intra-Fusion
over default pruning (percentage points) and, with more than two methods, the best one.
`finetune_table`: per (group, sparsity, method), the accuracy before and after each fine-tuning
epoch ("+ft" rows)."""
from __future__ import annotations

FT = "+ft"


def base_method(method: str) -> str:
    """The pruning method of a row: "intra_fusion+ft" -> "intra_fusion"."""
    return method.removesuffix(FT)


def cells_in_order(keys) -> list[tuple]:
    """(group, sparsity) pairs, groups in order of first appearance, sparsities ascending."""
    keys = list(dict.fromkeys(keys))
    groups = list(dict.fromkeys(g for g, _ in keys))
    return sorted(keys, key=lambda k: (groups.index(k[0]), k[1]))


def _percent(value: float | None) -> str:
    return f"{100 * value:.2f}%" if value is not None else "-"


def _title(rows: list[dict], heading: str) -> str:
    base = next((r["accuracy"] for r in rows if r["method"] == "none"), None)
    return f"{heading}: unpruned {100 * base:.2f}%" if base is not None else heading


def _render(title: str, header: list[str], body: list[list[str]], left: int | None) -> str:
    """The title, then columns as wide as their widest cell, right-aligned but column `left`."""
    widths = [max(len(c) for c in column) for column in zip(header, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([title, line(header)] + [line(cells) for cells in body])


def summary_table(rows: list[dict], criterion: str) -> str:
    """Table of the rows (typed result rows) of one criterion without fine-tuning; the 'none' row
    gives the header. `best` names the most accurate method(s) of a row, ties joined by '='."""
    rows = [r for r in rows if r["criterion"] == criterion]
    pruned = [r for r in rows if r["method"] != "none" and not r["method"].endswith(FT)]
    methods = list(dict.fromkeys(r["method"] for r in pruned))
    cells = {(r["group"], r["sparsity"], r["method"]): r["accuracy"] for r in pruned}
    with_gain = {"default", "intra_fusion"} <= set(methods)
    with_best = len(methods) > 2
    header = ["group", "sparsity"] + [m.rjust(7) for m in methods]
    header += ["gain".rjust(7)] * with_gain + ["best"] * with_best
    body = []
    for group, sparsity in cells_in_order((r["group"], r["sparsity"]) for r in pruned):
        values = {m: cells.get((group, sparsity, m)) for m in methods}
        line = [str(group).rjust(5), f"{sparsity:8.2f}"] + [_percent(v) for v in values.values()]
        if with_gain:
            d, f = values["default"], values["intra_fusion"]
            line.append(f"{100 * (f - d):+.2f}" if d is not None and f is not None else "-")
        if with_best:
            top = max((v for v in values.values() if v is not None), default=None)
            line.append("=".join(m for m, v in values.items() if v == top) if top is not None else "-")
        body.append(line)
    return _render(_title(rows, criterion), header, body, left=len(header) - 1 if with_best else None)


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


def budget_table(rows: list[dict], criterion: str) -> str | None:
    """Per (budget, allocation) of the budget rows of one criterion, without fine-tuning: each
    method's accuracy and the MACs it kept (% of the unpruned row's); None without budget rows."""
    rows = [r for r in rows if r["criterion"] == criterion]
    cells = [r for r in rows if r.get("allocation") and not r["method"].endswith(FT)]
    if not cells:
        return None
    base = next((r["macs"] for r in rows if r["method"] == "none"), None)
    methods = list(dict.fromkeys(r["method"] for r in cells))
    found = {(r["budget_kind"], r["budget"], r["allocation"], r["method"]): r for r in cells}
    keys = sorted(dict.fromkeys(k[:3] for k in found), key=lambda k: (k[0], -k[1]))
    body = []
    for kind, budget, allocation in keys:
        line = [f"{kind} {budget:.2f}", allocation]
        for m in methods:
            r = found.get((kind, budget, allocation, m))
            line.append("-" if r is None else _percent(r["accuracy"])
                        + (f" ({100 * r['macs'] / base:.1f}%)" if base else ""))
        body.append(line)
    return _render(_title(rows, f"{criterion} budgets (accuracy, MACs kept)"),
                   ["budget", "allocation"] + methods, body, left=1)
