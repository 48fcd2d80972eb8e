"""The command line: main.py, the `intrafusion` command's subcommands, and their mistakes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, read_rows, without_timing
from intrafusion.cli import COMMANDS, main, package_main
from intrafusion.experiments.results import CSV_COLUMNS


@pytest.fixture()
def cifar_run(grid_env, tmp_path):
    """(a fresh folder, the shared data folder, the shared checkpoint)."""
    return tmp_path, *grid_env


def test_main_writes_the_grid_csv(cifar_run, capsys):
    tmp, data, ckpt = cifar_run
    out = tmp / "res.csv"
    code = main(["--model-name", "vgg11_bn", "--dataset", "cifar10", "--data-dir", str(data),
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
    tmp, data, ckpt = cifar_run
    monkeypatch.chdir(tmp)
    assert main(["--dataset", "cifar10", "--data-dir", str(data), "--checkpoint", str(ckpt), "--group_idxs", "0",
                 "--sparsities", "0.5", "--methods", "intra_fusion", "--importance_criteria", "l2"]) == 0
    rows = read_rows(tmp / "results" / "vgg11_bn_cifar10_l2.csv")
    assert [r["method"] for r in rows] == ["none", "intra_fusion"]
    assert list(rows[0]) == CSV_COLUMNS


@pytest.mark.parametrize("args,message", [
    (["--model-name", "vgg12"], "unknown model name 'vgg12'"),
    (["--group_idxs", "8"], "group index 8 out of range: the model has 8 groups"),
])
def test_a_mistake_creates_no_default_output_folder(cifar_run, capsys, args, message, monkeypatch):
    """Before loading anything (the model name) or after the checkpoint (the group range):
    test_errors.py has every mistake; here the default results/ folder is not created."""
    tmp, data, ckpt = cifar_run
    monkeypatch.chdir(tmp)
    assert main(["--dataset", "cifar10", "--data-dir", str(data), "--checkpoint", str(ckpt)] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp / "results").exists()


@pytest.mark.parametrize("name,flag", [("grid", "--importance_criteria"), ("train", "--epochs"),
                                       ("plot", "--out")])
def test_every_subcommand_has_its_flags_and_help(name, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        package_main([name, "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: intrafusion {name} ") and flag in printed
    assert COMMANDS[name].summary.split(":")[0] in " ".join(printed.split())


def test_grid_subcommand_is_main_py(cifar_run, capsys):
    """`intrafusion grid …` and `main.py …` with the same flags write the same rows."""
    tmp, data, ckpt = cifar_run
    args = ["--dataset", "cifar10", "--data-dir", str(data), "--checkpoint", str(ckpt),
            "--group_idxs", "7", "--sparsities", "0.5", "--quiet"]
    assert main(args + ["--out", str(tmp / "a.csv")]) == 0
    assert package_main(["grid", *args, "--out", str(tmp / "b.csv")]) == 0
    assert without_timing(read_rows(tmp / "a.csv")) == without_timing(read_rows(tmp / "b.csv"))
    assert len(read_rows(tmp / "a.csv")) == 3


@pytest.mark.parametrize("argv,message", [
    ([], "the following arguments are required: COMMAND (see intrafusion --help)"),
    (["prune"], "invalid choice: 'prune'"),
    (["grid", "--sparsities", "half"], "invalid float value: 'half' (see intrafusion grid --help)"),
    (["train", "--epochs", "x"], "invalid int value: 'x' (see intrafusion train --help)"),
])
def test_subcommand_mistakes_are_one_line(argv, message, capsys):
    assert package_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_script_entry_points_run():
    """main.py, train.py and `python -m intrafusion` from the repository root."""
    for argv, flag in ((["main.py"], "--importance_criteria"), (["train.py"], "--epochs"),
                       (["-m", "intrafusion", "grid"], "--importance_criteria")):
        proc = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and flag in proc.stdout, proc.stderr


def test_console_command_is_installed():
    """`pip install -e .` (the README's test command) puts `intrafusion` beside the interpreter."""
    script = Path(sys.executable).parent / "intrafusion"
    assert script.is_file() and os.access(script, os.X_OK), f"{script} missing: run pip install -e ."
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and "grid" in proc.stdout and "plot" in proc.stdout, proc.stderr
