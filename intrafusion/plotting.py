"""Pictures of a results CSV: per group, test accuracy against sparsity, one line per method
(and criterion), the unpruned accuracy as a dashed line. Drawn with matplotlib's Agg canvas."""
from __future__ import annotations

import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import UserError
from .results import read_table
from .storage import check_writable, write_failure

_NEEDED = {"criterion", "group", "sparsity", "method", "accuracy"}
_LABELS = {"default": "default", "intra_fusion": "Intra-Fusion"}


def _series(rows: list[dict]) -> dict[tuple[str, str], dict[int, list[tuple[float, float]]]]:
    """{(criterion, method): {group: [(sparsity, accuracy %), ...] sorted by sparsity}}."""
    series: dict = {}
    for r in rows:
        if r["method"] != "none":
            points = series.setdefault((r["criterion"], r["method"]), {}).setdefault(r["group"], [])
            points.append((r["sparsity"], 100 * r["accuracy"]))
    for groups in series.values():
        for points in groups.values():
            points.sort()
    return series


def _title(rows: list[dict], criteria: list[str]) -> str:
    first = rows[0]
    where = f"{first['model']} on {first['dataset']}, " if {"model", "dataset"} <= set(first) else ""
    return f"{where}{', '.join(criteria)}: test accuracy after pruning one group"


def _draw_group(ax, group: int, series: dict, criteria: list[str], unpruned: float | None) -> None:
    """One subplot: every series that has points for `group`, and the unpruned line."""
    for color, ((criterion, method), per_group) in enumerate(series.items()):
        if group in per_group:
            x, y = zip(*per_group[group])
            label = _LABELS.get(method, method) + (f" ({criterion})" if len(criteria) > 1 else "")
            ax.plot(x, y, marker="o", color=f"C{color}", label=label)
    ax.set_xticks(sorted({s for per_group in series.values() for s, _ in per_group.get(group, [])}))
    if unpruned is not None:
        ax.axhline(unpruned, color="0.3", linestyle="--", linewidth=1,
                   label=f"unpruned ({unpruned:.2f}%)")
    ax.set_title(f"group {group}")
    ax.set_xlabel("sparsity")
    ax.grid(alpha=0.3)


def draw(rows: list[dict]) -> Figure:
    """A figure with one subplot per group of the typed result rows (shared accuracy axis)."""
    series = _series(rows)
    if not series:
        raise UserError("nothing to plot: the CSV holds no pruned cell yet")
    groups = sorted({g for per_group in series.values() for g in per_group})
    criteria = list(dict.fromkeys(c for c, _ in series))
    unpruned = next((100 * r["accuracy"] for r in rows if r["method"] == "none"), None)
    cols, nrows = min(3, len(groups)), math.ceil(len(groups) / 3)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    for ax, group in zip(axes.flat, groups):
        _draw_group(ax, group, series, criteria, unpruned)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    legend: dict = {}
    for ax in axes.flat[:len(groups)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=len(legend),
               frameon=False)
    fig.suptitle(_title(rows, criteria))
    return fig


def plot_results(csv_path: Path | str, png_path: Path | str | None = None) -> Path:
    """Draw the results CSV into `png_path` (default: beside it, same name, .png); the path."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path} not found: pass a CSV written by main.py")
    header, rows = read_table(csv_path)
    if header is None or not _NEEDED <= set(header):
        raise UserError(f"{csv_path} is not a results CSV of main.py (columns "
                        f"{', '.join(sorted(_NEEDED))} needed)")
    png = Path(png_path) if png_path else csv_path.with_suffix(".png")
    check_writable(png)
    fig = draw(rows)
    tmp = png.with_name(png.name + ".tmp")
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, png)
    except OSError as exc:
        if tmp.exists():
            tmp.unlink()
        raise write_failure(png, exc, "rerun the plot command") from None
    return png
