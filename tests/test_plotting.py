"""Pictures and the end-of-run table."""
import subprocess
import sys

import pytest
from matplotlib.image import imread

from helpers import ROOT
from intrafusion.cli import main, package_main
from intrafusion.errors import IntraFusionError
from intrafusion.experiments.plotting import draw, draw_finetune, plot_all
from intrafusion.experiments.report import summary_table
from intrafusion.experiments.results import CsvLog, read_table

BASE = dict(model="vgg11_bn", dataset="cifar10", fusion_rule="fork", target="most_important",
            source_prob="uniform", target_prob="uniform", p=1.0, checkpoint_sha256="ab",
            params=1, prune_seconds=0.0, macs=1, epoch=0, repair_batches=10, finetune_epochs=0,
            finetune_lr=0.01)


def grid_rows(criteria=("l1",), groups=(1, 2), sparsities=(0.3, 0.5, 0.7)):
    rows = []
    for c in criteria:
        rows.append(dict(BASE, criterion=c, group=-1, sparsity=0.0, method="none", accuracy=0.9))
        for g in groups:
            depth = 3 if g == "all" else g + 1
            for s in sparsities:
                rows.append(dict(BASE, criterion=c, group=g, sparsity=s, method="default",
                                 accuracy=0.9 - s * depth / 4))
                rows.append(dict(BASE, criterion=c, group=g, sparsity=s, method="intra_fusion",
                                 accuracy=0.9 - s / 10))
    return rows


def finetune_rows(rows, epochs=2):
    """`rows` and, for each pruned row, "+ft" rows with accuracy 0.8 + epoch / 100."""
    return rows + [dict(r, method=r["method"] + "+ft", epoch=e, accuracy=0.8 + e / 100)
                   for r in rows if r["method"] != "none" for e in range(1, epochs + 1)]


def write_csv(path, rows):
    with CsvLog(path) as log:
        for row in rows:
            log.write(row)
    return path


def test_one_subplot_per_group_with_a_line_per_method_and_the_unpruned_line(tmp_path):
    _, rows = read_table(write_csv(tmp_path / "r.csv", grid_rows(groups=(1, 2, 3, 5))))
    fig = draw(rows)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["group 1", "group 2", "group 3", "group 5"]
    for ax in axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"default", "Intra-Fusion", "unpruned (90.00%)"}
        assert list(lines["default"].get_xdata()) == [0.3, 0.5, 0.7]
        assert lines["unpruned (90.00%)"].get_ydata()[0] == pytest.approx(90.0)
        assert lines["unpruned (90.00%)"].get_linestyle() == "--"
    y = axes[1].get_lines()[0].get_ydata()
    assert list(y) == pytest.approx([100 * (0.9 - s * 3 / 4) for s in (0.3, 0.5, 0.7)])


def test_several_criteria_get_their_own_lines(tmp_path):
    _, rows = read_table(write_csv(tmp_path / "r.csv", grid_rows(criteria=("l1", "lamp"))))
    labels = {line.get_label() for line in draw(rows).axes[0].get_lines()}
    assert labels == {"default (l1)", "Intra-Fusion (l1)", "default (lamp)",
                      "Intra-Fusion (lamp)", "unpruned (90.00%)"}


def test_group_all_is_the_last_subplot_and_new_methods_have_readable_labels(tmp_path):
    methods = ["default", "intra_fusion", "default_repair", "intra_fusion_repair",
               "intra_fusion_varfix", "intra_fusion_varfix_repair"]
    rows = [dict(BASE, criterion="l1", group=-1, sparsity=0.0, method="none", accuracy=0.9)]
    rows += [dict(BASE, criterion="l1", group=g, sparsity=s, method=m, accuracy=0.5 + i / 100)
             for g in ("all", 2, 1) for s in (0.3, 0.5) for i, m in enumerate(methods)]
    _, rows = read_table(write_csv(tmp_path / "r.csv", rows))
    axes = [ax for ax in draw(rows).axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["group 1", "group 2", "all groups"]
    lines = {line.get_label(): line for line in axes[2].get_lines()}
    assert set(lines) == {"default", "Intra-Fusion", "default + repair", "Intra-Fusion + repair",
                          "Intra-Fusion varfix", "Intra-Fusion varfix + repair", "unpruned (90.00%)"}
    assert list(lines["Intra-Fusion varfix"].get_ydata()) == pytest.approx([54.0, 54.0])


def test_finetune_rows_stay_out_of_the_sparsity_plot(tmp_path):
    plain = draw(grid_rows(groups=(1, "all")))
    tuned = draw(finetune_rows(grid_rows(groups=(1, "all"))))
    for ax, ax_plain in zip(tuned.axes, plain.axes):
        assert ([(l.get_label(), list(l.get_xdata()), list(l.get_ydata())) for l in ax.get_lines()]
                == [(l.get_label(), list(l.get_xdata()), list(l.get_ydata()))
                    for l in ax_plain.get_lines()])
    assert [ax.get_title() for ax in tuned.axes] == ["group 1", "all groups"]


def test_finetune_figure_has_a_subplot_per_cell_and_starts_at_epoch_zero():
    rows = finetune_rows(grid_rows(groups=("all", 1), sparsities=(0.3, 0.5)))
    axes = [ax for ax in draw_finetune(rows).axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [
        "group 1, sparsity 0.30", "group 1, sparsity 0.50",
        "all groups, sparsity 0.30", "all groups, sparsity 0.50"]
    lines = {line.get_label(): line for line in axes[3].get_lines()}
    assert set(lines) == {"default", "Intra-Fusion", "unpruned (90.00%)"}
    assert list(lines["default"].get_xdata()) == [0, 1, 2]
    assert list(lines["default"].get_ydata()) == pytest.approx([90 - 50 * 3 / 4, 81, 82])
    assert lines["unpruned (90.00%)"].get_linestyle() == "--"
    assert draw_finetune(grid_rows()) is None


def test_plot_all_writes_the_finetune_png_only_with_finetune_rows(tmp_path):
    plain = write_csv(tmp_path / "plain.csv", grid_rows())
    assert plot_all(plain) == [tmp_path / "plain.png"]
    tuned = write_csv(tmp_path / "tuned.csv", finetune_rows(grid_rows(groups=(1, "all"))))
    pngs = [tmp_path / "tuned.png", tmp_path / "tuned_finetune.png"]
    assert plot_all(tuned) == pngs
    for png in [tmp_path / "plain.png"] + pngs:
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "plain.csv", "plain.png", "tuned.csv", "tuned.png", "tuned_finetune.png"]
    assert plot_all(tuned, tmp_path / "out" / "x.png")[0] == tmp_path / "out" / "x.png"
    assert (tmp_path / "out" / "x_finetune.png").is_file()


def test_plot_command_writes_a_png_beside_the_csv(tmp_path, capsys):
    csv = write_csv(tmp_path / "x.csv", grid_rows())
    assert package_main(["plot", str(csv)]) == 0
    png = tmp_path / "x.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    image = imread(png)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200
    assert not list(tmp_path.glob("*.tmp"))
    assert plot_all(csv, tmp_path / "other.png")[0] == tmp_path / "other.png"


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path):
    csv = write_csv(tmp_path / "x.csv", grid_rows())
    proc = subprocess.run([sys.executable, "-m", "intrafusion", "plot", str(csv)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content,message", [
    (None, "not found"),
    ("name,score\nx,1\n", "not a results CSV"),
    ("only the 'none' row", "nothing to plot"),
])
def test_plot_errors_are_one_line(tmp_path, capsys, content, message):
    csv = tmp_path / "x.csv"
    if content == "only the 'none' row":
        write_csv(csv, grid_rows()[:1])
    elif content is not None:
        csv.write_text(content)
    assert package_main(["plot", str(csv)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_plot_into_an_unwritable_place(tmp_path):
    csv = write_csv(tmp_path / "x.csv", grid_rows())
    (tmp_path / "file").write_text("")
    with pytest.raises(IntraFusionError, match="cannot write .*file is not a directory"):
        plot_all(csv, tmp_path / "file" / "x.png")[0]
    plot_all(csv, tmp_path / "new" / "x.png")[0]
    assert (tmp_path / "new" / "x.png").is_file()


def test_summary_table():
    rows = grid_rows(groups=(1,), sparsities=(0.3, 0.5))
    assert summary_table(rows, "l1") == "\n".join([
        "l1: unpruned 90.00%",
        "group  sparsity  default  intra_fusion     gain",
        "    1      0.30   75.00%        87.00%   +12.00",
        "    1      0.50   65.00%        85.00%   +20.00",
    ])
    one = summary_table([r for r in rows if r["method"] != "intra_fusion"], "l1")
    assert one.splitlines()[1] == "group  sparsity  default"


def test_main_plot_flag_and_final_table(grid_env, tmp_path, capsys):
    data, ckpt = grid_env
    out = tmp_path / "res" / "run.csv"
    assert main(["--data-dir", str(data), "--checkpoint", str(ckpt), "--group_idxs", "6", "7",
                 "--sparsities", "0.5", "--out", str(out), "--plot", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    assert "group  sparsity  default  intra_fusion     gain" in printed.out
    assert "    6      0.50" in printed.out and "    7      0.50" in printed.out
    assert f"wrote {out.with_suffix('.png')}" in printed.out
    assert imread(out.with_suffix(".png")).ndim == 3
