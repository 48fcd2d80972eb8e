"""Cells computed away from the driver (experiments/parallel.py): `--workers N` local processes and
Ray tasks write the serial run's CSV (row order and prune_seconds aside), a worker killed mid-grid
loses nothing, and the flags' mistakes are one line. The CUDA variants run where a GPU is."""
import copy
import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, cells, failing_worker, narrow_and_killed, narrow_vggs, read_rows, use_narrow_vggs,
                     without_timing)
from intrafusion.cli import main
from intrafusion.experiments import parallel
from intrafusion.experiments.grid import GridConfig, run_grid
from intrafusion.evaluator import shard_slice

GRID = ["--group_idxs", "1", "3", "5", "7", "--sparsities", "0.3", "0.5", "0.7"]  # 12 chunks of 2 cells
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def grid(data, ckpt, out, *extra):
    return ["--data-dir", str(data), "--checkpoint", str(ckpt), "--out", str(out), *GRID, *extra]


@pytest.fixture(scope="module")
def serial(grid_files, tmp_path_factory):
    """serial(*flags): the rows of GRID computed in this process with `flags`, once per flags."""
    folder, known = tmp_path_factory.mktemp("serial"), {}

    def rows(*flags):
        if flags not in known:
            out = folder / f"{len(known)}.csv"
            with narrow_vggs():
                assert main(grid(*grid_files, out, *flags)) == 0
            known[flags] = read_rows(out)
        return known[flags]
    return rows


def assert_same_rows(rows, reference):
    """The same rows, each once, whatever their order and prune_seconds."""
    assert len({(*c, r["epoch"]) for c, r in zip(cells(rows), rows)}) == len(rows)
    key = functools.partial(json.dumps, sort_keys=True)
    assert sorted(map(key, without_timing(rows))) == sorted(map(key, without_timing(reference)))


@pytest.fixture()
def workers_setup(monkeypatch):
    """setup(function): worker processes run `function` first (default: build the narrow VGG)."""
    def setup(function=use_narrow_vggs):
        monkeypatch.setattr(parallel, "worker_setup", function)
    setup()
    return setup


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), pytest.param(("--gpu_id", "0"), marks=CUDA, id="cuda")])
def test_workers_write_the_serial_csv(grid_env, serial, workers_setup, tmp_path, capsys, flags):
    reference, out = serial(*flags), tmp_path / "w.csv"
    capsys.readouterr()
    assert main(grid(*grid_env, out, "--workers", "2", *flags)) == 0
    rows = read_rows(out)
    assert rows[0]["method"] == "none"
    assert_same_rows(rows, reference)
    printed = capsys.readouterr().out
    assert printed.count(" sparsity 0.") == 12  # one line per chunk, as it is recorded


@pytest.mark.slow
def test_workers_split_the_test_set_and_their_counts_add_up_to_the_serial_csv(grid_files, workers_setup,
                                                                             narrow_vgg, tmp_path):
    """With several evaluation batches (30 images in batches of 8), each of 2 workers evaluates
    every cell on 2 of the 4 batches: the accuracies merged from their correct counts are the
    serial run's exactly, the unpruned row's included."""
    data, ckpt = grid_files

    def run(name, workers, log):
        config = GridConfig(dataset="cifar10", data_dir=str(data), checkpoint=ckpt, group_idxs=(1, 3),
                            sparsities=(0.3, 0.7), eval_batch_size=8, workers=workers, out=tmp_path / name)
        run_grid(config, log=log)
        return read_rows(tmp_path / name)
    logs = []
    reference = run("serial.csv", 1, lambda _: None)
    rows = run("workers.csv", 2, logs.append)
    assert "l1     8 cells: pruned here, each worker evaluates them all on its part of the test set" in logs
    assert rows[0]["method"] == "none"
    assert len({r["accuracy"] for r in rows}) > 2  # the cells' accuracies differ: a real check
    assert_same_rows(rows, reference)


def test_shards_are_runs_of_whole_batches_that_cover_the_test_set():
    for count, batch, shards in [(30, 8, 2), (10000, 1000, 2), (10000, 1000, 3), (5, 8, 1), (17, 4, 4)]:
        parts = [shard_slice(count, batch, i, shards) for i in range(shards)]
        assert [i for p in parts for i in range(count)[p]] == list(range(count))
        assert all(p.start % batch == 0 for p in parts)
        sizes = [len(range(count)[p]) for p in parts]
        assert max(sizes) - min(sizes) <= batch
    assert shard_slice(30, 8, 0, 2) == slice(0, 16) and shard_slice(30, 8, 1, 2) == slice(16, 30)


def test_merged_shards_give_the_serial_mean():
    parts = [([7 / 16, 1 / 16], 11 / 16, 16), ([3 / 14, 0.0], 13 / 14, 14)]
    assert parallel.merge_shards(parts) == ([10 / 30, 1 / 30], 24 / 30)


def test_packed_variants_carry_only_what_pruning_changed(narrow_vgg):
    """A variant sharing its unchanged tensors with the base travels as those it changed; the
    receiver's copy of the base supplies the rest, and the variant computes as before."""
    from intrafusion.groups import Pruner
    from intrafusion.importance import Scorer
    from intrafusion.models import build_model
    from intrafusion.evaluator import share_unchanged
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    base = Pruner(build_model("vgg11_bn", 10).eval(), x[:1])
    variant = base.copy()
    variant.prune_group(1, 0.5, "intra_fusion", Scorer("l1"))
    share_unchanged(base.model, variant.model)
    payload = parallel.pack_variants(base.model, [variant])
    changed = sum(t.numel() * t.element_size() for n, t in variant.model.state_dict().items()
                  if not torch.equal(t, base.model.state_dict()[n]) or t.shape != base.model.state_dict()[n].shape)
    total = sum(t.numel() * t.element_size() for t in variant.model.state_dict().values())
    assert changed <= len(payload) < changed + 0.1 * total
    receiver = Pruner(copy.deepcopy(base.model), x[:1])  # another process's base: equal, not the same
    (got,) = parallel.unpack_variants(receiver.model, payload)
    assert got.model.features[0].weight is receiver.model.features[0].weight
    assert got.channel_map.keys() == variant.channel_map.keys()
    with torch.inference_mode():
        assert torch.equal(got.model(x), variant.model(x))


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_run_completes(grid_env, serial, workers_setup, tmp_path, capsys):
    """The first worker to start a chunk is SIGKILLed: the pool is replaced, the chunks not yet
    recorded are computed again, and the CSV is the serial one (fine-tuning rows too)."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    workers_setup(functools.partial(narrow_and_killed, tokens, 1, 1))
    out = tmp_path / "w.csv"
    assert main(grid(*grid_env, out, "--workers", "2", "--finetune-epochs", "1")) == 0
    assert (tokens / "0").exists()
    assert "a worker process died (killed, or out of memory?)" in capsys.readouterr().out
    assert_same_rows(read_rows(out), serial("--finetune-epochs", "1"))


@pytest.mark.slow
def test_workers_that_keep_dying_stop_the_run_and_a_rerun_resumes(grid_env, serial, workers_setup,
                                                                   tmp_path, capsys):
    """Every worker dies on its first chunk: after RETRIES broken pools the run stops with one line
    and exit code 2, the CSV keeps its rows, and the same command resumes it to the serial CSV."""
    out = tmp_path / "w.csv"
    data, ckpt = grid_env
    assert main(["--data-dir", str(data), "--checkpoint", str(ckpt), "--out", str(out),
                 "--group_idxs", "1", "--sparsities", "0.3", "0.5"]) == 0
    before = out.read_bytes()
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    workers_setup(functools.partial(narrow_and_killed, tokens, 1, 100))
    capsys.readouterr()
    assert main(grid(data, ckpt, out, "--workers", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: a worker process died {parallel.RETRIES} times in a row")
    assert err.count("\n") == 1
    assert out.read_bytes() == before
    workers_setup()
    assert main(grid(data, ckpt, out, "--workers", "2")) == 0
    assert "resuming, 4 of 24 cells done" in capsys.readouterr().out
    assert out.read_bytes().startswith(before)
    assert_same_rows(read_rows(out), serial())


@pytest.mark.parametrize("args,message", [
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
    (["--ray-address", "auto", "--gpus-per-worker", "-1"], "--gpus-per-worker must be at least 0, got -1.0"),
    (["--gpus-per-worker", "1"], "--gpus-per-worker is for Ray tasks (with --ray-address)"),
    (["--ray-address", "auto", "--workers", "2"], "--workers is for local processes"),
    (["--ray-address", ""], "--ray-address must be a Ray cluster address or 'auto'"),
])
def test_bad_parallel_flags_are_one_line(grid_env, tmp_path, capsys, args, message):
    assert main(grid(*grid_env, tmp_path / "x.csv", *args)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.csv").exists()


def test_ray_address_without_ray_names_the_extra(grid_env, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else find_spec(name, *a))
    assert main(grid(*grid_env, tmp_path / "x.csv", "--ray-address", "auto")) == 2
    assert capsys.readouterr().err == 'error: --ray-address needs Ray: pip install "intrafusion[ray]"\n'
    assert not (tmp_path / "x.csv").exists()


def test_no_ray_cluster_is_one_line_before_anything_is_written(grid_env, tmp_path, capsys, monkeypatch):
    """Placed before the tests that start a local Ray: `auto` then finds no cluster."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized() or Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray cluster is running")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "x.csv"
    assert main(grid(*grid_env, out, "--ray-address", "auto")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the Ray cluster at auto: ") and err.count("\n") == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs whose workers can import the tests' helpers."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "tests")}})
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), pytest.param(("--gpu_id", "0", "--gpus-per-worker", "0.5"),
                                                    marks=CUDA, id="cuda")])
def test_ray_tasks_write_the_serial_csv_though_a_worker_dies(ray_cluster, grid_env, serial, workers_setup,
                                                             tmp_path, flags):
    """Ray tasks on a local cluster, one of whose workers is SIGKILLed at its first chunk (Ray
    runs that task again): the CSV is the serial one."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    workers_setup(functools.partial(narrow_and_killed, tokens, 1, 1))
    out = tmp_path / "r.csv"
    assert main(grid(*grid_env, out, "--ray-address", "auto", *flags)) == 0
    assert (tokens / "0").exists()
    assert_same_rows(read_rows(out), serial(*flags[:2]))


@pytest.mark.parametrize("pool", [("--workers", "2"),
                                  pytest.param(("--ray-address", "auto"), marks=pytest.mark.slow, id="ray")])
def test_a_workers_error_is_the_drivers_one_line(request, grid_env, workers_setup, tmp_path, capsys, pool):
    if "--ray-address" in pool:
        request.getfixturevalue("ray_cluster")
    workers_setup(failing_worker)
    capsys.readouterr()
    out = tmp_path / "x.csv"
    assert main(grid(*grid_env, out, *pool)) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: this worker cannot compute the cells"
    assert len(err) == 1 or "--ray-address" in pool  # Ray may still log the last test's dead worker
    assert [r["method"] for r in read_rows(out)] in ([], ["none"])  # no cell's row
