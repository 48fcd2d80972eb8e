"""The compact table printed at the end of a grid run: group × sparsity rows, one accuracy column
per method and the gain of Intra-Fusion over default pruning, in percentage points."""
from __future__ import annotations


def summary_table(rows: list[dict], criterion: str) -> str:
    """Table of the rows (typed result rows) of one criterion; the 'none' row gives the header."""
    rows = [r for r in rows if r["criterion"] == criterion]
    base = next((r["accuracy"] for r in rows if r["method"] == "none"), None)
    pruned = [r for r in rows if r["method"] != "none"]
    methods = list(dict.fromkeys(r["method"] for r in pruned))
    cells = {(r["group"], r["sparsity"], r["method"]): r["accuracy"] for r in pruned}
    with_gain = {"default", "intra_fusion"} <= set(methods)
    columns = methods + (["gain"] if with_gain else [])
    widths = [max(len(c), 7) for c in columns]
    title = f"{criterion}: unpruned {100 * base:.2f}%" if base is not None else criterion
    lines = [title, "group  sparsity  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    for group, sparsity in dict.fromkeys((r["group"], r["sparsity"]) for r in pruned):
        values = [cells.get((group, sparsity, m)) for m in methods]
        text = [f"{100 * v:.2f}%" if v is not None else "-" for v in values]
        if with_gain:
            d, f = cells.get((group, sparsity, "default")), cells.get((group, sparsity, "intra_fusion"))
            text.append(f"{100 * (f - d):+.2f}" if d is not None and f is not None else "-")
        lines.append(f"{group:5d}  {sparsity:8.2f}  " + "  ".join(t.rjust(w) for t, w in zip(text, widths)))
    return "\n".join(lines)
