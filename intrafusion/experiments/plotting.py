"""Pictures of a results CSV, drawn with matplotlib's Agg canvas.

The sparsity plot: per group ("all" = whole-network pruning, last), test accuracy against sparsity,
one line per method (and criterion), the unpruned accuracy as a dashed line. Budget cells
(main.py --macs): accuracy against the MACs kept, log-scaled, one line per method × allocation.
The fine-tuning plot
(only when the CSV has "+ft" rows): per (group, sparsity), accuracy against fine-tuning epoch
(0 = before fine-tuning), one line per method. A language model's CSV (results.LM_CSV_COLUMNS) is
drawn with its test perplexity in the place of the accuracy (lower is better; on a log axis when
the values span more than a factor WIDE_RANGE), its budget cells against the share of the decoder
blocks' parameters (or MACs) kept."""
from __future__ import annotations

import math
import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

from ..allocation import ALLOCATIONS
from ..errors import IntraFusionError
from ..methods import METHOD_NAMES
from .report import ACCURACY, FT, PERPLEXITY, base_method, metric_of
from .results import read_table
from ..storage import atomic_write, check_writable

_NEEDED = {"criterion", "group", "sparsity", "method"}  # and the metric's column
WIDE_RANGE = 4.0  # perplexities spanning more than this factor are drawn on a log axis
_LABELS = {"default": "default", "intra_fusion": "Intra-Fusion",
           "default_repair": "default + repair", "intra_fusion_repair": "Intra-Fusion + repair",
           "intra_fusion_varfix": "Intra-Fusion varfix",
           "intra_fusion_varfix_repair": "Intra-Fusion varfix + repair",
           "default_reconstruct": "default + reconstruct", "intra_fusion_reconstruct": "Intra-Fusion + reconstruct"}


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


def _metric(rows: list[dict]):
    """The Metric the rows score (report.metric_of)."""
    return metric_of(rows[0]) if rows else ACCURACY


def _series(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """{(criterion, method): {group: [(sparsity, score as shown), ...] sorted}}, no "+ft" rows."""
    series: dict = {}
    metric = _metric(rows)
    for r in rows:
        if r["method"] != "none" and not r["method"].endswith(FT):
            points = series.setdefault((r["criterion"], r["method"]), {}).setdefault(r["group"], [])
            points.append((r["sparsity"], metric.value(r)))
    for groups in series.values():
        for points in groups.values():
            points.sort()
    return series


def _finetune_series(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """{(criterion, method): {(group, sparsity): [(epoch, accuracy %), ...] sorted}} for the
    cells with "+ft" rows; epoch 0 is the method's row before fine-tuning."""
    series: dict = {}
    metric = _metric(rows)
    for r in rows:
        if r["method"].endswith(FT):
            key = (r["criterion"], base_method(r["method"]))
            series.setdefault(key, {}).setdefault((r["group"], r["sparsity"]), []).append(
                (r["epoch"], metric.value(r)))
    for r in rows:
        cell = series.get((r["criterion"], r["method"]), {}).get((r["group"], r["sparsity"]))
        if cell is not None:
            cell.append((0, metric.value(r)))
    for cells in series.values():
        for points in cells.values():
            points.sort()
    return series


def _unpruned(rows: list[dict]) -> float | None:
    return next((_metric(rows).value(r) for r in rows if r["method"] == "none"), None)


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


def _draw_series(ax, points_of: dict, styles: dict, criteria: list[str], unpruned: float | None,
                 metric=ACCURACY):
    """Plot {(criterion, method): points} on `ax`, with the unpruned score dashed (a log axis when
    lower is better: perplexities)."""
    for (criterion, method), points in points_of.items():
        x, y = zip(*points)
        ax.plot(x, y, marker="o", color=styles[criterion, method],
                label=_label(criterion, method, criteria))
    if unpruned is not None:
        ax.axhline(unpruned, color="0.3", linestyle="--", linewidth=1,
                   label=f"unpruned ({unpruned:.2f}{metric.unit})")
    if metric.lower_is_better:
        _log_if_wide(ax)
    ax.grid(alpha=0.3)


def _log_if_wide(ax) -> None:
    """A log y axis with plain tick labels (1, 2, 5 per decade) when the drawn values span more
    than WIDE_RANGE."""
    low, high = ax.dataLim.y0, ax.dataLim.y1
    if low > 0 and high / low > WIDE_RANGE:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())


def _ylabel(ax, metric) -> str:
    return metric.label + (" (log scale)" if ax.get_yscale() == "log" else "")


def _finish(fig: Figure, axes: list, title: str, metric=ACCURACY) -> Figure:
    """The metric's label on the left column, one legend for all subplots, the title."""
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(_ylabel(ax, metric))
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
    styles, unpruned, metric = _styles(rows), _unpruned(rows), _metric(rows)
    fig, axes = _figure(len(groups), sharey=True)
    for ax, group in zip(axes, groups):
        _draw_series(ax, {k: per_group[group] for k, per_group in series.items() if group in per_group},
                     styles, criteria, unpruned, metric)
        ax.set_xticks(sorted({s for per_group in series.values() for s, _ in per_group.get(group, [])}))
        ax.set_title(_group_title(group))
        ax.set_xlabel("sparsity")
    what = ("one group or all" if "all" in groups and len(groups) > 1 else
            "all groups" if "all" in groups else "one group")
    return _finish(fig, axes, f"{_where(rows)}{', '.join(criteria)}: {metric.column} after pruning {what}",
                   metric)


def draw_finetune(rows: list[dict]) -> Figure | None:
    """One subplot per pruned (group, sparsity) cell with "+ft" rows: accuracy against fine-tuning
    epoch, one line per method; None when there is no "+ft" row."""
    series = _finetune_series(rows)
    if not series:
        return None
    cells = sorted({c for per_cell in series.values() for c in per_cell},
                   key=lambda c: (group_order(c[0]), c[1]))
    criteria = list(dict.fromkeys(c for c, _ in series))
    styles, unpruned, metric = _styles(rows), _unpruned(rows), _metric(rows)
    fig, axes = _figure(len(cells), sharey=False)
    for ax, cell in zip(axes, cells):
        _draw_series(ax, {k: per_cell[cell] for k, per_cell in series.items() if cell in per_cell},
                     styles, criteria, unpruned, metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{_group_title(cell[0])}, sparsity {cell[1]:.2f}")
        ax.set_xlabel("fine-tuning epoch")
    return _finish(fig, axes, f"{_where(rows)}{', '.join(criteria)}: test {metric.column} while fine-tuning",
                   metric)


def _budget_cost(rows: list[dict]) -> tuple[str, str]:
    """(column, words) of what a budget picture's x axis counts: the MACs, or for a language
    model the decoder blocks' parameters or MACs (what its budgets were given in; MACs if both)."""
    if _metric(rows) is not PERPLEXITY:
        return "macs", "MACs kept (fraction of the unpruned network, log scale)"
    kinds = {r["budget_kind"] for r in rows if r.get("allocation")}
    kind = kinds.pop() if len(kinds) == 1 else "macs"
    words = "parameters" if kind == "params" else "MACs"
    return f"block_{kind}", f"{words} of the decoder blocks kept (fraction of the unpruned, log scale)"


def _budget_series(rows: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """{(method, allocation): [(cost kept, score as shown), ...] by cost} of the budget rows
    without fine-tuning, the cost (_budget_cost) as a fraction of the unpruned row's."""
    cost, metric = _budget_cost(rows)[0], _metric(rows)
    base = next(r[cost] for r in rows if r["method"] == "none")
    series: dict = {}
    for r in rows:
        if r.get("allocation") and not r["method"].endswith(FT):
            series.setdefault((r["method"], r["allocation"]), []).append((r[cost] / base, metric.value(r)))
    return {k: sorted(v) for k, v in series.items()}


def draw_budgets(rows: list[dict]) -> Figure:
    """Test accuracy (a language model: perplexity, log axis) against the MACs kept (log axis),
    one line per method (color) × allocation (line style), the unpruned network as a star at 100%."""
    series = _budget_series(rows)
    metric = _metric(rows)
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
            label=f"unpruned ({unpruned:.2f}{metric.unit})")
    ax.set_xscale("log")
    if metric.lower_is_better:
        _log_if_wide(ax)
    # budgets to 5%: a cell a little under its budget (24.4% for 0.25) gets no tick of its own
    ticks = sorted({round(x * 20) / 20 for points in series.values() for x, _ in points} | {1.0})
    ax.set_xticks(ticks, [f"{100 * t:.0f}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(_budget_cost(rows)[1])
    ax.set_ylabel(_ylabel(ax, metric))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center", frameon=False, fontsize="small")
    criteria = ", ".join(dict.fromkeys(r["criterion"] for r in rows))
    fig.suptitle(f"{_where(rows)}{criteria}: test {metric.column} at a budget")
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
    if header is None or not _NEEDED | {metric_of(header).column} <= set(header):
        raise IntraFusionError(f"{csv_path} is not a results CSV of main.py (columns "
                        f"{', '.join(sorted(_NEEDED))} and accuracy or perplexity needed)")
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

