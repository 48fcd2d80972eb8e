"""Never lose work: rows are written as cells finish, killed runs resume to the same CSV, and
rows computed with other settings are never mixed in."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, calibrated_model, cells, narrow_vggs, read_rows, save_checkpoint, without_timing
from intrafusion.cli import main
from intrafusion.errors import IntraFusionError
from intrafusion.experiments.results import CSV_COLUMNS, CsvLog, previous_rows

# 12 quick cells, one line (2 cells) per chunk, so that rows appear while the run goes on
GRID = ["--group_idxs", "6", "7", "--sparsities", "0.3", "0.5", "0.7", "--cache-mb", "0"]


@pytest.fixture(scope="module")
def reference(full_grid_files, tmp_path_factory):
    """The CSV of an uninterrupted run of GRID on the full-size vgg11_bn (the subprocesses'
    model: a cell takes long enough to be interrupted)."""
    out = tmp_path_factory.mktemp("resume") / "reference.csv"
    assert main(command(*full_grid_files, out)[2:]) == 0
    return out


def command(data, ckpt, out, *extra):
    return [sys.executable, "main.py", "--data-dir", str(data), "--checkpoint", str(ckpt),
            "--out", str(out), *GRID, *extra]


def data_rows(path):
    return path.read_bytes().count(b"\n") - 1 if path.exists() else 0


def interrupt(args, out, sig, after_rows):
    """Start main.py, send `sig` once the CSV holds `after_rows` rows; (return code, stderr).
    SIGINT gets its default disposition back: a test run started in the background (`pytest &`)
    inherits it ignored, and Python then installs no KeyboardInterrupt handler."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while data_rows(out) < after_rows:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no rows appeared"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_run_killed_twice_resumes_to_the_uninterrupted_csv(full_grid_files, reference, tmp_path):
    """SIGINT after 3 rows, rerun, SIGKILL 3 rows later, rerun to the end: the CSV equals the
    uninterrupted run's (up to prune_seconds), without duplicate rows."""
    data, ckpt = full_grid_files
    out = tmp_path / "run.csv"
    code, err = interrupt(command(data, ckpt, out), out, signal.SIGINT, after_rows=3)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted; finished work is saved")
    first = read_rows(out)
    assert 3 <= len(first) < len(read_rows(reference))
    code, _ = interrupt(command(data, ckpt, out), out, signal.SIGKILL, after_rows=len(first) + 3)
    assert code == -signal.SIGKILL
    second = read_rows(out)
    assert second[:len(first)] == first and len(first) < len(second) < len(read_rows(reference))
    proc = subprocess.run(command(data, ckpt, out), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming, {len(second) - 1} of 12 cells done" in proc.stdout
    rows = read_rows(out)
    assert rows[:len(second)] == second
    assert len(set(cells(rows))) == len(rows)
    assert without_timing(rows) == without_timing(read_rows(reference))


@pytest.mark.slow
def test_file_size_limit_mid_row_leaves_whole_rows_and_resumes(full_grid_files, reference, tmp_path):
    """A real short write: the kernel stops the row at the limit; the half row is cut off."""
    data, ckpt = full_grid_files
    out = tmp_path / "run.csv"
    limit = len(",".join(CSV_COLUMNS)) + 1 + 300  # header, the 'none' row and half a row

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(command(data, ckpt, out), cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: disk full while writing") and proc.stderr.count("\n") == 1
    assert out.read_bytes().endswith(b"\n") and len(read_rows(out)) == 1
    assert main(command(data, ckpt, out)[2:]) == 0
    assert without_timing(read_rows(out)) == without_timing(read_rows(reference))


@pytest.fixture()
def run(grid_env, tmp_path, capsys):
    """main() in this process on the shared data; returns (exit code, stdout, stderr)."""
    data, ckpt = grid_env

    def run(*args, checkpoint=ckpt):
        code = main(["--data-dir", str(data), "--checkpoint", str(checkpoint),
                     "--out", str(tmp_path / "res.csv"), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def test_resume_computes_only_the_missing_cells(run, tmp_path):
    out = tmp_path / "res.csv"
    assert run("--group_idxs", "7", "--sparsities", "0.3")[0] == 0
    first = out.read_bytes()
    code, printed, _ = run("--group_idxs", "6", "7", "--sparsities", "0.3", "0.5")
    assert code == 0
    assert "resuming, 2 of 8 cells done" in printed
    assert "group  7 sparsity 0.30:" not in printed and "group  7 sparsity 0.50:" in printed
    assert out.read_bytes().startswith(first)
    rows = read_rows(out)
    assert len(rows) == 1 + 8 and len(set(cells(rows))) == len(rows)
    assert [r["method"] for r in rows].count("none") == 1
    assert "    7      0.30" in printed  # resumed cells are in the final table too


def test_rerunning_a_finished_grid_changes_nothing(run, tmp_path):
    args = ("--group_idxs", "7", "--sparsities", "0.3", "0.3", "--methods", "default")
    assert run(*args)[0] == 0
    before = (tmp_path / "res.csv").read_bytes()
    code, printed, err = run(*args)
    assert code == 0 and err == ""
    assert (tmp_path / "res.csv").read_bytes() == before
    assert "sparsity 0.30:" not in printed and "resuming, 1 of 1 cells done" in printed
    assert len(read_rows(tmp_path / "res.csv")) == 2  # a repeated sparsity is one cell


@pytest.fixture(scope="module")
def other_checkpoint(grid_files, tmp_path_factory):
    with narrow_vggs():
        return save_checkpoint(calibrated_model("vgg11_bn", grid_files[0], seed=1),
                               tmp_path_factory.mktemp("other") / "other.ckpt")


@pytest.mark.parametrize("args,differs", [
    (["--fusion-rule", "mean"], "fusion_rule=fork but this run has fusion_rule=mean"),
    (["--target", "cluster_centroid"], "target=most_important"),
    (["--source_prob", "importance"], "source_prob=uniform"),
    (["--p", "2"], "p=1.0 but this run has p=2.0"),
    (["--repair-batches", "3"], "repair_batches=10 but this run has repair_batches=3"),
    (["--finetune-epochs", "1"], "finetune_epochs=0 but this run has finetune_epochs=1"),
    (["--dataset", "cifar100"], "dataset=cifar10 but this run has dataset=cifar100"),
    ("other checkpoint", "checkpoint_sha256="),
])
def test_incomparable_rows_are_refused(run, tmp_path, other_checkpoint, args, differs):
    grid = ["--group_idxs", "7", "--sparsities", "0.3", "--methods", "default"]
    assert run(*grid)[0] == 0
    before = (tmp_path / "res.csv").read_bytes()
    extra = {"checkpoint": other_checkpoint} if args == "other checkpoint" else {}
    code, _, err = run(*grid, *([] if extra else args), **extra)
    assert code == 2 and differs in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert (tmp_path / "res.csv").read_bytes() == before


def test_overwrite_replaces_incomparable_rows(run, tmp_path):
    grid = ["--group_idxs", "7", "--sparsities", "0.3", "--methods", "default"]
    assert run(*grid)[0] == 0
    assert run(*grid, "--fusion-rule", "mean", "--overwrite")[0] == 0
    rows = read_rows(tmp_path / "res.csv")
    assert len(rows) == 2 and {r["fusion_rule"] for r in rows} == {"mean"}


def test_a_foreign_csv_is_refused_unless_overwrite(run, tmp_path):
    (tmp_path / "res.csv").write_text("name,score\nx,1\n")
    code, _, err = run("--group_idxs", "7", "--sparsities", "0.3")
    assert code == 2 and "not a results CSV of this version" in err
    assert (tmp_path / "res.csv").read_text() == "name,score\nx,1\n"
    assert run("--group_idxs", "7", "--sparsities", "0.3", "--overwrite")[0] == 0
    assert list(read_rows(tmp_path / "res.csv")[0]) == CSV_COLUMNS


def test_no_resume_refuses_a_csv_with_rows(run, tmp_path):
    grid = ["--group_idxs", "7", "--sparsities", "0.3", "--methods", "default"]
    assert run(*grid)[0] == 0
    code, _, err = run(*grid, "--no-resume")
    assert code == 2 and "already holds 2 result rows" in err and "--resume" in err
    assert run(*grid, "--no-resume", "--overwrite")[0] == 0
    assert len(read_rows(tmp_path / "res.csv")) == 2


def test_half_row_left_by_a_kill_is_cut_and_recomputed(run, tmp_path):
    out = tmp_path / "res.csv"
    grid = ["--group_idxs", "7", "--sparsities", "0.3", "--methods", "default", "intra_fusion"]
    assert run(*grid)[0] == 0
    whole = read_rows(out)
    text = out.read_bytes()
    out.write_bytes(text[: text.rstrip(b"\n").rfind(b"\n") + 40])  # last row cut after 39 bytes
    code, printed, _ = run(*grid)
    assert code == 0 and "resuming, 1 of 2 cells done" in printed
    assert without_timing(read_rows(out)) == without_timing(whole)


def test_csv_log_rolls_back_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "x.csv"
    log = CsvLog(path)
    log.write({"model": "m", "method": "none"})
    before = path.read_bytes()
    real = os.write

    def half_then_full(fd, data):
        real(fd, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(IntraFusionError, match="disk full while writing .*x.csv"):
        log.write({"model": "m", "method": "default"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    log.write({"model": "m", "method": "intra_fusion"})
    log.close()
    assert [r["method"] for r in read_rows(path)] == ["none", "intra_fusion"]


def test_previous_rows_of_a_fresh_or_header_only_file(tmp_path):
    path = tmp_path / "r.csv"
    assert previous_rows(path, {}) == []
    CsvLog(path).close()
    assert previous_rows(path, {}, resume=False) == []
    path.write_text(",".join(CSV_COLUMNS)[:20])  # header cut by a kill
    assert previous_rows(path, {}) == []
    CsvLog(path).close()
    assert path.read_text() == ",".join(CSV_COLUMNS) + "\n"


def test_progress_bar_only_when_asked(grid_env, tmp_path, capsys):
    from intrafusion.experiments.grid import GridConfig, run_grid
    data, ckpt = grid_env
    config = GridConfig(data_dir=str(data), checkpoint=ckpt, group_idxs=(7,), sparsities=(0.3,),
                        methods=("default",), out=tmp_path / "a.csv")
    run_grid(config, progress=False)
    assert capsys.readouterr().err == ""
    config.out = tmp_path / "b.csv"
    run_grid(config, progress=True)
    assert "grid: 100%" in capsys.readouterr().err
    torch.testing.assert_close(float(read_rows(tmp_path / "a.csv")[1]["accuracy"]),
                               float(read_rows(tmp_path / "b.csv")[1]["accuracy"]))
