"""`intrafusion compress` / `evaluate` and the grid's budget cells, on tiny generated CIFAR data
and a small MobileNetV2 (compress) or vgg11_bn (grid)."""
import json

import pytest

from helpers import calibrated_model, read_rows, save_checkpoint, write_cifar
from intrafusion.cli import main, package_main
from intrafusion.experiments.plotting import plot_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(data folder with 300 training and 40 test images, a mobilenetv2 checkpoint)."""
    root = tmp_path_factory.mktemp("compress_env")
    data = root / "data"
    write_cifar(data, n_train=300, n_test=40)
    return data, save_checkpoint(calibrated_model("mobilenetv2", data), root / "mobilenetv2.checkpoint")


def compress(env, tmp_path, *flags, out="small.pt"):
    data, ckpt = env
    return package_main(["compress", "--model-name", "mobilenetv2", "--dataset", "cifar10",
                         "--data-dir", str(data), "--checkpoint", str(ckpt), "--calibration-batches", "1",
                         "--held-out", "60", "--profile-cache", str(tmp_path / "profiles.json"),
                         "--out", str(tmp_path / out), *flags])


def test_compress_meets_the_budget_and_evaluate_agrees(env, tmp_path, capsys):
    assert compress(env, tmp_path, "--macs", "0.5", "--allocation", "global") == 0
    report = json.loads((tmp_path / "small.json").read_text())
    assert set(report) >= {"base", "compressed", "sparsities", "settings", "seconds"}
    base, small = report["base"], report["compressed"]
    assert 0.48 <= small["macs"] / base["macs"] <= 0.5   # 16-channel groups: coarse steps
    assert small["params"] < base["params"] and 0 <= small["accuracy"] <= 1
    assert report["settings"]["macs"] == 0.5 and report["settings"]["allocation"] == "global"
    assert report["settings"]["method"] == "default_reconstruct" and report["settings"]["calibration_batches"] == 1
    assert len(set(report["sparsities"].values())) > 1 and all(0 <= s < 1 for s in report["sparsities"].values())
    capsys.readouterr()
    data, _ = env
    assert package_main(["evaluate", str(tmp_path / "small.pt"), "--dataset", "cifar10",
                         "--data-dir", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == small


def test_sensitivity_profile_is_measured_once_for_several_budgets(env, tmp_path):
    assert compress(env, tmp_path, "--macs", "0.6", "--method", "intra_fusion", "--allocation", "sensitivity") == 0
    first = json.loads((tmp_path / "small.json").read_text())
    cache = json.loads((tmp_path / "profiles.json").read_text())
    assert len(cache) == 1
    assert compress(env, tmp_path, "--params", "0.4", "--method", "intra_fusion", "--allocation", "sensitivity",
                    out="smaller.pt") == 0
    second = json.loads((tmp_path / "smaller.json").read_text())
    assert json.loads((tmp_path / "profiles.json").read_text()) == cache   # reused, not remeasured
    assert 0.59 <= first["compressed"]["macs"] / first["base"]["macs"] <= 0.6
    assert 0.39 <= second["compressed"]["params"] / second["base"]["params"] <= 0.4
    assert second["seconds"] < first["seconds"]


@pytest.mark.parametrize("flags, message", [
    (["--macs", "1.0"], "outside (0, 1)"),
    (["--macs", "0"], "outside (0, 1)"),
    (["--params", "-0.5"], "outside (0, 1)"),
    (["--sparsity", "0.3", "--macs", "0.5"], "only one of"),
    ([], "no sparsity given"),
    (["--macs", "0.5", "--calibration-batches", "0"], "needs calibration data"),
    (["--macs", "0.5", "--allocation", "best"], "unknown allocation"),
    (["--macs", "0.00001", "--allocation", "uniform"], "unreachable"),
])
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, capsys, flags, message):
    data, ckpt = env
    code = package_main(["compress", "--model-name", "mobilenetv2", "--dataset", "cifar10",
                         "--data-dir", str(data), "--checkpoint", str(ckpt),
                         "--out", str(tmp_path / "x.pt"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


def test_grid_budget_cells_resume_and_plot_against_macs(grid_env, tmp_path, capsys):
    data, ckpt = grid_env
    out = tmp_path / "budget.csv"
    argv = ["--model-name", "vgg11_bn", "--dataset", "cifar10", "--data-dir", str(data),
            "--checkpoint", str(ckpt), "--group_idxs", "all", "--macs", "0.5", "0.25",
            "--allocation", "uniform", "global", "--methods", "default", "intra_fusion", "--out", str(out)]
    assert main(argv) == 0
    rows = read_rows(out)
    budget = [r for r in rows if r["allocation"]]
    assert len(budget) == 2 * 2 * 2 and rows[0]["method"] == "none"
    base = int(rows[0]["macs"])
    for r in budget:
        assert r["budget_kind"] == "macs" and r["group"] == "all"
        assert float(r["budget"]) - 0.02 <= int(r["macs"]) / base <= float(r["budget"])  # narrow: coarse steps
        assert len(json.loads(r["sparsities"])) == 8
    uniform = [r for r in budget if r["allocation"] == "uniform"]
    # one common sparsity, up to one channel of the narrowest group (8 channels in the narrow VGG)
    assert all(max(s) - min(s) <= 1 / 8 for s in (list(json.loads(r["sparsities"]).values()) for r in uniform))
    assert main(argv) == 0    # resumed: nothing new
    assert len(read_rows(out)) == len(rows)
    assert "resuming, 8 of 8 cells done" in capsys.readouterr().out
    png, = plot_all(out)
    assert png.stat().st_size > 10_000
