import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import randomize_batchnorms, write_cifar
from intrafusion.cli import main
from intrafusion.experiments.results import CSV_COLUMNS
from intrafusion.models import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cifar_run(tmp_path):
    write_cifar(tmp_path / "data", n_train=40, n_test=30)
    torch.manual_seed(0)
    model = randomize_batchnorms(build_model("vgg11_bn"))
    ckpt = tmp_path / "vgg.checkpoint"
    torch.save({"model_state_dict": model.state_dict(), "test_accuracy": 10.0, "epoch": 1}, ckpt)
    return tmp_path, ckpt


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_main_writes_the_grid_csv(cifar_run, capsys):
    tmp, ckpt = cifar_run
    out = tmp / "res.csv"
    code = main(["--model-name", "vgg11_bn", "--dataset", "cifar10", "--data-dir", str(tmp / "data"),
                 "--checkpoint", str(ckpt), "--group_idxs", "1", "2", "--sparsities", "0.3", "0.6",
                 "--out", str(out)])
    assert code == 0
    with open(out) as f:
        header = f.readline().strip().split(",")
    assert header[:9] == ["model", "dataset", "criterion", "group", "sparsity", "method", "accuracy",
                          "params", "prune_seconds"]
    rows = read_rows(out)
    assert len(rows) == 1 + 2 * 2 * 2
    assert rows[0]["method"] == "none" and rows[0]["group"] == "-1" and rows[0]["sparsity"] == "0.0"
    cells = {(r["group"], r["sparsity"], r["method"]) for r in rows[1:]}
    assert cells == {(g, s, m) for g in ("1", "2") for s in ("0.3", "0.6")
                     for m in ("default", "intra_fusion")}
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert r["model"] == "vgg11_bn" and r["dataset"] == "cifar10" and r["criterion"] == "l1"
    params = {(r["group"], r["sparsity"]): int(r["params"]) for r in rows[1:]}
    assert params[("1", "0.6")] < params[("1", "0.3")] < int(rows[0]["params"])
    printed = capsys.readouterr().out
    assert "group  1 sparsity 0.30: default" in printed and "intra_fusion" in printed


def test_main_default_output_path(cifar_run, monkeypatch):
    tmp, ckpt = cifar_run
    monkeypatch.chdir(tmp)
    assert main(["--dataset", "cifar10", "--checkpoint", str(ckpt), "--group_idxs", "0",
                 "--sparsities", "0.5", "--methods", "intra_fusion", "--importance_criteria", "l2"]) == 0
    rows = read_rows(tmp / "results" / "vgg11_bn_cifar10_l2.csv")
    assert [r["method"] for r in rows] == ["none", "intra_fusion"]
    assert list(rows[0]) == CSV_COLUMNS


@pytest.mark.parametrize("args,message", [
    (["--model-name", "vgg12"], "unknown model name 'vgg12'"),
    (["--importance_criteria", "l3"], "unknown criterion 'l3'"),
    (["--target", "nearest"], "unknown target 'nearest'"),
    (["--fusion-rule", "sum"], "unknown fusion rule 'sum'"),
    (["--sparsities", "1.0"], "sparsity 1.0 outside [0, 1)"),
    (["--group_idxs", "8"], "group index 8 out of range: the model has 8 groups"),
    (["--checkpoint", "missing.checkpoint"], "checkpoint missing.checkpoint not found"),
])
def test_bad_input_is_one_line_and_exit_code_2(cifar_run, capsys, args, message, monkeypatch):
    tmp, ckpt = cifar_run
    monkeypatch.chdir(tmp)
    base = ["--dataset", "cifar10", "--checkpoint", str(ckpt)]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp / "results").exists()


def test_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--importance_criteria" in proc.stdout
