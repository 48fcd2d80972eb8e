"""compress's sensitivity profile away from the driver and across interruptions
(experiments/compress.py, parallel.py, allocation/profile.py): `--workers` and `--ray-address`
give the serial run's plan and model, a killed worker is replaced, an unreachable cluster is one
line, an interrupted profile resumes from the groups its cache kept, and unwritable outputs are
refused before any work. The narrow VGG11-BN on generated CIFAR-format data."""
import functools
import json
from pathlib import Path

import pytest
import torch

from helpers import ROOT, calibrated_model, narrow_and_killed, narrow_vggs, save_checkpoint, use_narrow_vggs, write_cifar
from intrafusion import load
from intrafusion.allocation import profile as profile_module
from intrafusion.allocation import read_partial, read_profile, write_profile
from intrafusion.cli import package_main
from intrafusion.experiments import compress as compress_module
from intrafusion.experiments import parallel

GROUPS = 8  # the narrow VGG11-BN's


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(data folder with 300 training and 40 test images, a narrow vgg11_bn checkpoint)."""
    root = tmp_path_factory.mktemp("compress_parallel")
    write_cifar(root / "data", n_train=300, n_test=40)
    with narrow_vggs():
        return root / "data", save_checkpoint(calibrated_model("vgg11_bn", root / "data"), root / "vgg.checkpoint")


def compress(env, folder: Path, *flags, out="small.pt"):
    """Exit code of `intrafusion compress` to 50% of the MACs (sensitivity, intra_fusion_repair)."""
    data, ckpt = env
    return package_main(["compress", "--model-name", "vgg11_bn", "--dataset", "cifar10", "--data-dir", str(data),
                         "--checkpoint", str(ckpt), "--calibration-batches", "1", "--held-out", "60",
                         "--macs", "0.5", "--allocation", "sensitivity", "--method", "intra_fusion_repair",
                         "--profile-cache", str(folder / "profiles.json"),
                         "--out", str(folder / out), *flags])


def outcome(folder: Path, out="small.pt") -> tuple[dict, dict, dict]:
    """(the report's plan and compressed measurements, the saved model's tensors, the cached profile)."""
    report = json.loads((folder / out).with_suffix(".json").read_text())
    cache = json.loads((folder / "profiles.json").read_text())
    assert len(cache) == 1
    (entry,) = cache.values()
    assert entry.get("complete", True)
    return ({"plan": report["sparsities"], "compressed": report["compressed"]},
            load(folder / out).state_dict(), entry["profile"])


def assert_same(got, reference):
    (plan, state, profile), (plan0, state0, profile0) = got, reference
    assert plan == plan0
    assert state.keys() == state0.keys() and all(torch.equal(state[k], state0[k]) for k in state)
    assert profile == profile0


@pytest.fixture(scope="module")
def serial(env, tmp_path_factory):
    """The outcome of the serial run."""
    folder = tmp_path_factory.mktemp("serial")
    with narrow_vggs():
        assert compress(env, folder) == 0
    result = outcome(folder)
    assert len(result[2]) == GROUPS and len(set(result[0]["plan"].values())) > 1  # a real plan
    return result


@pytest.fixture()
def calls(monkeypatch):
    """{"load": data loads, "rungs": profile groups measured} by this process, counted."""
    counts = {"load": 0, "rungs": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return counted
    monkeypatch.setattr(compress_module, "open_inputs", counting("load", compress_module.open_inputs))
    monkeypatch.setattr(profile_module, "measure_rungs", counting("rungs", profile_module.measure_rungs))
    return counts


@pytest.fixture()
def workers_setup(monkeypatch):
    """setup(function): worker processes run `function` first (default: build the narrow VGG)."""
    def setup(function=use_narrow_vggs):
        monkeypatch.setattr(parallel, "worker_setup", function)
    setup()
    return setup


@pytest.mark.slow
def test_workers_give_the_serial_plan_and_model(env, serial, narrow_vgg, workers_setup, calls, tmp_path):
    assert compress(env, tmp_path, "--workers", "2") == 0
    assert calls == {"load": 1, "rungs": 0}  # every group measured by the workers
    assert_same(outcome(tmp_path), serial)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_profile_completes(env, serial, narrow_vgg, workers_setup, tmp_path,
                                                               capsys):
    """The first worker to evaluate a group's rungs is SIGKILLed: the pool is replaced, the
    groups not yet received are measured again, and the outcome is the serial one."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    workers_setup(functools.partial(narrow_and_killed, tokens, 1, 1))
    assert compress(env, tmp_path, "--workers", "2") == 0
    assert (tokens / "0").exists()
    assert "a worker process died (killed, or out of memory?)" in capsys.readouterr().out
    assert_same(outcome(tmp_path), serial)


def test_an_interrupted_profile_resumes_from_the_groups_it_measured(env, serial, narrow_vgg, calls, tmp_path,
                                                                     monkeypatch, capsys):
    """Ctrl-C when the fourth group's rungs are to be measured: exit 130, the cache keeps the
    three groups measured, and the same command measures only the other five and gives the
    serial outcome."""
    measure = profile_module.measure_rungs  # counting calls

    def interrupted(*args):
        if calls["rungs"] == 3:
            raise KeyboardInterrupt
        return measure(*args)
    monkeypatch.setattr(profile_module, "measure_rungs", interrupted)
    assert compress(env, tmp_path) == 130
    assert "interrupted; finished work is saved" in capsys.readouterr().err
    assert not (tmp_path / "small.pt").exists()
    (key,) = json.loads((tmp_path / "profiles.json").read_text())
    assert read_profile(tmp_path / "profiles.json", key) is None  # not a whole profile
    known, seconds, _ = read_partial(tmp_path / "profiles.json", key)
    assert len(known) == 3 and seconds > 0
    monkeypatch.setattr(profile_module, "measure_rungs", measure)
    calls["rungs"] = 0
    assert compress(env, tmp_path) == 0
    assert calls["rungs"] == GROUPS - 3
    assert_same(outcome(tmp_path), serial)


def test_partial_profiles_are_kept_apart_from_whole_ones(tmp_path):
    path = tmp_path / "profiles.json"
    write_profile(path, "k", {"a": 1}, {3: [(0.2, 0.5)]}, 4.0, 3.0, complete=False)
    assert read_profile(path, "k") is None
    assert read_partial(path, "k") == ({3: [(0.2, 0.5)]}, 4.0, 3.0)
    write_profile(path, "k", {"a": 1}, {3: [(0.2, 0.5)], 4: []}, 5.0)
    assert read_profile(path, "k") == {3: [(0.2, 0.5)], 4: []}
    assert read_partial(path, "k") == ({}, 0.0, 0.0)


@pytest.mark.parametrize("flags, message", [
    (["--out", "{file}/small.pt"], "is not a directory"),
    (["--out", "{folder}"], "it is a directory"),
    (["--onnx", "{file}/small.onnx"], "is not a directory"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--workers", "2", "--ray-address", "auto"], "--workers is for local processes"),
    (["--workers", "2", "--criterion", "random"], "criterion 'random' draws its scores"),
])
def test_bad_outputs_and_pools_are_refused_before_any_work(env, calls, tmp_path, capsys, flags, message):
    (tmp_path / "file").write_text("")
    flags = [f.format(file=tmp_path / "file", folder=tmp_path) for f in flags]
    assert compress(env, tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert calls == {"load": 0, "rungs": 0}
    assert not (tmp_path / "profiles.json").exists() and not (tmp_path / "small.pt").exists()


def test_an_unreachable_cluster_is_one_line_before_any_work(env, calls, tmp_path, capsys, monkeypatch):
    """Placed before the test that starts a local Ray: `auto` then finds no cluster."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized() or Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray cluster is running")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert compress(env, tmp_path, "--ray-address", "auto") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the Ray cluster at auto: ") and err.count("\n") == 1
    assert calls == {"load": 0, "rungs": 0}
    assert not (tmp_path / "profiles.json").exists()


@pytest.mark.slow
def test_ray_tasks_give_the_serial_plan_and_model(env, serial, narrow_vgg, workers_setup, calls, tmp_path):
    """Ray tasks on a local cluster of 2 CPUs measure every group: the serial outcome."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "tests")}})
    try:
        assert compress(env, tmp_path, "--ray-address", "auto") == 0
    finally:
        ray.shutdown()
    assert calls == {"load": 1, "rungs": 0}
    assert_same(outcome(tmp_path), serial)
