"""Pictures and the end-of-run table."""
import subprocess
import sys

import pytest
from matplotlib.image import imread

from grid_env import ROOT, make_env
from intrafusion.cli import main, package_main
from intrafusion.errors import UserError
from intrafusion.plotting import draw, plot_results
from intrafusion.report import summary_table
from intrafusion.results import CsvLog, read_table

BASE = dict(model="vgg11_bn", dataset="cifar10", fusion_rule="fork", target="most_important",
            source_prob="uniform", target_prob="uniform", p=1.0, checkpoint_sha256="ab",
            params=1, prune_seconds=0.0)


def grid_rows(criteria=("l1",), groups=(1, 2), sparsities=(0.3, 0.5, 0.7)):
    rows = []
    for c in criteria:
        rows.append(dict(BASE, criterion=c, group=-1, sparsity=0.0, method="none", accuracy=0.9))
        for g in groups:
            for s in sparsities:
                rows.append(dict(BASE, criterion=c, group=g, sparsity=s, method="default",
                                 accuracy=0.9 - s * (g + 1) / 4))
                rows.append(dict(BASE, criterion=c, group=g, sparsity=s, method="intra_fusion",
                                 accuracy=0.9 - s / 10))
    return rows


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


def test_plot_command_writes_a_png_beside_the_csv(tmp_path, capsys):
    csv = write_csv(tmp_path / "x.csv", grid_rows())
    assert package_main(["plot", str(csv)]) == 0
    png = tmp_path / "x.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    image = imread(png)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200
    assert not list(tmp_path.glob("*.tmp"))
    assert plot_results(csv, tmp_path / "other.png") == tmp_path / "other.png"


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
    with pytest.raises(UserError, match="cannot write .*file is not a directory"):
        plot_results(csv, tmp_path / "file" / "x.png")
    plot_results(csv, tmp_path / "new" / "x.png")
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


def test_main_plot_flag_and_final_table(tmp_path, capsys):
    data, ckpt = make_env(tmp_path)
    out = tmp_path / "res" / "run.csv"
    assert main(["--data-dir", str(data), "--checkpoint", str(ckpt), "--group_idxs", "6", "7",
                 "--sparsities", "0.5", "--out", str(out), "--plot", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    assert "group  sparsity  default  intra_fusion     gain" in printed.out
    assert "    6      0.50" in printed.out and "    7      0.50" in printed.out
    assert f"wrote {out.with_suffix('.png')}" in printed.out
    assert imread(out.with_suffix(".png")).ndim == 3
