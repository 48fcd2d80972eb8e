"""Pictures of a results CSV, drawn with matplotlib's Agg canvas.

The sparsity plot: per group ("all" = whole-network pruning, last), test accuracy against sparsity,
one line per method (and criterion), the unpruned accuracy as a dashed line. Budget cells
(main.py --macs): accuracy against the MACs kept, log-scaled, one line per method × allocation.
The fine-tuning plot
(only when the CSV has "+ft" rows): per (group, sparsity), accuracy against fine-tuning epoch
(0 = before fine-tuning), one line per method."""
from __future__ import annotations

import math
import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..allocation import ALLOCATIONS
from ..errors import IntraFusionError
from ..methods import METHOD_NAMES
from .report import FT, base_method
from .results import read_table
from ..storage import atomic_write, check_writable

_NEEDED = {"criterion", "group", "sparsity", "method", "accuracy"}
_LABELS = {"default": "default", "intra_fusion": "Intra-Fusion",
           "default_repair": "default + repair", "intra_fusion_repair": "Intra-Fusion + repair",
           "intra_fusion_varfix": "Intra-Fusion varfix",
           "intra_fusion_varfix_repair": "Intra-Fusion varfix + repair"}


def group_order(group) -> tuple:
    """Sort key of a group: int indices ascending, then "all"."""
    return (group == "all", 0 if group == "all" else group)


def _group_title(group) -> str:
    return "all groups" if group == "all" else f"group {group}"


def _styles(rows: list[dict]) -> dict[tuple[str, str], str]:
    """{(criterion, method): color}, the same in both pictures (a "+ft" row counts as its method)."""
    keys = dict.fromkeys((r["criterion"], base_method(r["method"])) for r in rows
                         if r["method"] != "none")
    return {key: f"C{i}" for i, key in enumerate(keys)}


def _label(criterion: str, method: str, criteria: list[str]) -> str:
    return _LABELS.get(method, method) + (f" ({criterion})" if len(criteria) > 1 else "")


def _series(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """{(criterion, method): {group: [(sparsity, accuracy %), ...] sorted}}, no "+ft" rows."""
    series: dict = {}
    for r in rows:
        if r["method"] != "none" and not r["method"].endswith(FT):
            points = series.setdefault((r["criterion"], r["method"]), {}).setdefault(r["group"], [])
            points.append((r["sparsity"], 100 * r["accuracy"]))
    for groups in series.values():
        for points in groups.values():
            points.sort()
    return series


def _finetune_series(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """{(criterion, method): {(group, sparsity): [(epoch, accuracy %), ...] sorted}} for the
    cells with "+ft" rows; epoch 0 is the method's row before fine-tuning."""
    series: dict = {}
    for r in rows:
        if r["method"].endswith(FT):
            key = (r["criterion"], base_method(r["method"]))
            series.setdefault(key, {}).setdefault((r["group"], r["sparsity"]), []).append(
                (r["epoch"], 100 * r["accuracy"]))
    for r in rows:
        cell = series.get((r["criterion"], r["method"]), {}).get((r["group"], r["sparsity"]))
        if cell is not None:
            cell.append((0, 100 * r["accuracy"]))
    for cells in series.values():
        for points in cells.values():
            points.sort()
    return series


def _unpruned(rows: list[dict]) -> float | None:
    return next((100 * r["accuracy"] for r in rows if r["method"] == "none"), None)


def _where(rows: list[dict]) -> str:
    first = rows[0]
    return f"{first['model']} on {first['dataset']}, " if {"model", "dataset"} <= set(first) else ""


def _figure(count: int, sharey: bool) -> tuple[Figure, list]:
    """A figure with `count` visible subplots, three per line (wide enough for title and legend)."""
    cols, nrows = min(3, count), math.ceil(count / 3)
    fig = Figure(figsize=(max(4.2 * cols, 8.0), 3.4 * nrows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=sharey)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _draw_series(ax, points_of: dict, styles: dict, criteria: list[str], unpruned: float | None):
    """Plot {(criterion, method): points} on `ax`, with the unpruned accuracy dashed."""
    for (criterion, method), points in points_of.items():
        x, y = zip(*points)
        ax.plot(x, y, marker="o", color=styles[criterion, method],
                label=_label(criterion, method, criteria))
    if unpruned is not None:
        ax.axhline(unpruned, color="0.3", linestyle="--", linewidth=1,
                   label=f"unpruned ({unpruned:.2f}%)")
    ax.grid(alpha=0.3)


def _finish(fig: Figure, axes: list, title: str) -> Figure:
    """Accuracy labels on the left column, one legend for all subplots, the title."""
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("test accuracy (%)")
    legend: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    lines = math.ceil(len(legend) / (2 * min(3, len(axes))))  # about two entries per subplot
    fig.legend(legend.values(), legend.keys(), loc="outside lower center",
               ncols=math.ceil(len(legend) / lines),
               frameon=False)
    fig.suptitle(title)
    return fig


def draw(rows: list[dict]) -> Figure:
    """A figure with one subplot per group of the typed result rows (shared accuracy axis)."""
    series = _series(rows)
    if not series:
        raise IntraFusionError("nothing to plot: the CSV holds no pruned cell yet")
    groups = sorted({g for per_group in series.values() for g in per_group}, key=group_order)
    criteria = list(dict.fromkeys(c for c, _ in series))
    styles, unpruned = _styles(rows), _unpruned(rows)
    fig, axes = _figure(len(groups), sharey=True)
    for ax, group in zip(axes, groups):
        _draw_series(ax, {k: per_group[group] for k, per_group in series.items() if group in per_group},
                     styles, criteria, unpruned)
        ax.set_xticks(sorted({s for per_group in series.values() for s, _ in per_group.get(group, [])}))
        ax.set_title(_group_title(group))
        ax.set_xlabel("sparsity")
    what = ("one group or all" if "all" in groups and len(groups) > 1 else
            "all groups" if "all" in groups else "one group")
    return _finish(fig, axes, f"{_where(rows)}{', '.join(criteria)}: test accuracy after pruning {what}")


def draw_finetune(rows: list[dict]) -> Figure | None:
    """One subplot per pruned (group, sparsity) cell with "+ft" rows: accuracy against fine-tuning
    epoch, one line per method; None when there is no "+ft" row."""
    series = _finetune_series(rows)
    if not series:
        return None
    cells = sorted({c for per_cell in series.values() for c in per_cell},
                   key=lambda c: (group_order(c[0]), c[1]))
    criteria = list(dict.fromkeys(c for c, _ in series))
    styles, unpruned = _styles(rows), _unpruned(rows)
    fig, axes = _figure(len(cells), sharey=False)
    for ax, cell in zip(axes, cells):
        _draw_series(ax, {k: per_cell[cell] for k, per_cell in series.items() if cell in per_cell},
                     styles, criteria, unpruned)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{_group_title(cell[0])}, sparsity {cell[1]:.2f}")
        ax.set_xlabel("fine-tuning epoch")
    return _finish(fig, axes, f"{_where(rows)}{', '.join(criteria)}: test accuracy while fine-tuning")


def _budget_series(rows: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """{(method, allocation): [(MACs kept, accuracy %), ...] by MACs} of the budget rows without
    fine-tuning, MACs as a fraction of the unpruned row's."""
    base = next(r["macs"] for r in rows if r["method"] == "none")
    series: dict = {}
    for r in rows:
        if r.get("allocation") and not r["method"].endswith(FT):
            series.setdefault((r["method"], r["allocation"]), []).append((r["macs"] / base, 100 * r["accuracy"]))
    return {k: sorted(v) for k, v in series.items()}


def draw_budgets(rows: list[dict]) -> Figure:
    """Test accuracy against the MACs kept (log axis), one line per method (color) × allocation
    (line style), the unpruned network as a star at 100%."""
    series = _budget_series(rows)
    fig = Figure(figsize=(8.0, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    # one color per method and one line style per allocation in every picture, so they compare
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys((*METHOD_NAMES, *(m for m, _ in series))))}
    dashes = dict(zip(dict.fromkeys((*reversed(ALLOCATIONS), *(a for _, a in series))), ("-", "--", ":", "-.")))
    for (method, allocation), points in series.items():
        x, y = zip(*points)
        ax.plot(x, y, marker="o", color=colors[method], linestyle=dashes.get(allocation, "-"),
                label=f"{_LABELS.get(method, method)}, {allocation}")
    unpruned = _unpruned(rows)
    ax.plot([1.0], [unpruned], marker="*", markersize=14, color="0.2", linestyle="none",
            label=f"unpruned ({unpruned:.2f}%)")
    ax.set_xscale("log")
    # budgets to 5%: a cell a little under its budget (24.4% for 0.25) gets no tick of its own
    ticks = sorted({round(x * 20) / 20 for points in series.values() for x, _ in points} | {1.0})
    ax.set_xticks(ticks, [f"{100 * t:.0f}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("MACs kept (fraction of the unpruned network, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center", frameon=False, fontsize="small")
    criteria = ", ".join(dict.fromkeys(r["criterion"] for r in rows))
    fig.suptitle(f"{_where(rows)}{criteria}: test accuracy at a MACs budget")
    return fig


def _save(fig: Figure, png: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(png, buffer.getvalue(), "rerun the plot command")


def plot_all(csv_path: Path | str, png_path: Path | str | None = None) -> list[Path]:
    """Draw the results CSV into `png_path` (default: beside it, same name, .png) and, when it has
    "+ft" rows, the fine-tuning plot into `<png stem>_finetune.png` beside that; budget rows
    (main.py --macs) are drawn against MACs (draw_budgets), into `png_path` when the CSV holds
    nothing else, else `<png stem>_macs.png`; the paths written."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise IntraFusionError(f"{csv_path} not found: pass a CSV written by main.py")
    header, rows = read_table(csv_path)
    if header is None or not _NEEDED <= set(header):
        raise IntraFusionError(f"{csv_path} is not a results CSV of main.py (columns "
                        f"{', '.join(sorted(_NEEDED))} needed)")
    png = Path(png_path) if png_path else csv_path.with_suffix(".png")
    plain = [r for r in rows if not r.get("allocation")]
    budget = len(plain) < len(rows)
    figures = {}
    if not budget or any(r["method"] != "none" for r in plain):
        figures[png] = draw(plain)
        finetune = draw_finetune(plain)
        if finetune is not None:
            figures[png.with_name(png.stem + "_finetune.png")] = finetune
    if budget:
        figures[png.with_name(png.stem + "_macs.png") if figures else png] = draw_budgets(rows)
    for path in figures:
        check_writable(path)
    for path, fig in figures.items():
        _save(fig, path)
    return list(figures)

