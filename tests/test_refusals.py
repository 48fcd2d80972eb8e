"""Inputs that cannot give a meaningful result are refused before any work, in one line naming
the problem (exit 2): non-finite checkpoints, negative counts and budgets, and a missing CIFAR-10
checkpoint or data folder (the line says where the paper's checkpoints come from)."""
from __future__ import annotations

import shutil

import pytest
import torch

from intrafusion.cli import main, train_main
from intrafusion.errors import IntraFusionError
from intrafusion.experiments import data as data_module
from intrafusion.experiments.grid import GridConfig, validate
from intrafusion.experiments.training import TrainSettings


def refused(capsys, entry, args, message, out=None) -> str:
    """entry(args) exits 2 with one line `error: …` containing `message` and writes no `out`."""
    assert entry(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert out is None or not out.exists()
    return err.strip()


@pytest.fixture()
def grid(grid_env, tmp_path):
    data, ckpt = grid_env
    out = tmp_path / "res.csv"
    return ["--data-dir", str(data), "--group_idxs", "7", "--sparsities", "0.5", "--out", str(out)], ckpt, out


def broken_copy(ckpt, tmp_path, values: dict) -> str:
    """A copy of checkpoint `ckpt` with some tensor elements replaced: {key: value}."""
    state = torch.load(ckpt, weights_only=True)
    for key, value in values.items():
        state["model_state_dict"][key].view(-1)[0] = value
    path = tmp_path / "broken.checkpoint"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("values,first", [
    ({"features.4.weight": float("nan")}, "features.4.weight"),
    ({"features.1.running_var": float("inf")}, "features.1.running_var"),
    ({"classifier.bias": float("-inf"), "features.8.bias": float("nan")}, "features.8.bias"),
])
def test_a_checkpoint_with_non_finite_values_is_refused(capsys, grid, tmp_path, values, first):
    args, ckpt, out = grid
    path = broken_copy(ckpt, tmp_path, values)
    err = refused(capsys, main, args + ["--checkpoint", path], f"holds NaN or infinite values in "
                  f"tensor {first!r}", out)
    assert err.count("tensor '") == 1


@pytest.mark.parametrize("flag,value,message", [
    ("--cache-mb", "-1", "--cache-mb must be at least 0, got -1.0"),
    ("--cache-mb", "nan", "--cache-mb must be at least 0, got nan"),
    ("--repair-batches", "-1", "--repair-batches must be at least 0, got -1"),
    ("--finetune-epochs", "-2", "--finetune-epochs must be at least 0, got -2"),
    ("--finetune-lr", "-0.1", "--finetune-lr must be a positive number, got -0.1"),
    ("--finetune-lr", "inf", "--finetune-lr must be a positive number, got inf"),
    ("--p", "-1", "p must be positive, got -1.0"),
    ("--gpu_id", "-2", "--gpu_id must be -1 (the CPU) or a CUDA device index, got -2"),
])
def test_negative_counts_and_budgets_are_refused(capsys, grid, flag, value, message):
    args, ckpt, out = grid
    refused(capsys, main, args + ["--checkpoint", str(ckpt), flag, value], message, out)


def test_the_library_validates_the_grid_settings_itself():
    with pytest.raises(IntraFusionError, match="--cache-mb must be at least 0"):
        validate(GridConfig(cache_mb=-5))
    with pytest.raises(IntraFusionError, match="batch_size must be at least 1"):
        validate(GridConfig(batch_size=0))
    validate(GridConfig(cache_mb=0, repair_batches=0))   # nothing cached, no repair: fine


@pytest.mark.parametrize("flag,value,message", [
    ("--epochs", "-1", "got --epochs -1"),
    ("--batch-size", "-5", "got --batch-size -5"),
    ("--lr", "-0.1", "got --lr -0.1"),
    ("--momentum", "-0.5", "--momentum must lie in (0, 1) (SGD's momentum, AdamW's beta1), got -0.5"),
    ("--weight-decay", "-1", "--weight-decay must be >= 0, got -1.0"),
    ("--seed", "-1", "--seed must lie in [0, 2**63), got -1"),
    ("--gpu_id", "-3", "--gpu_id must be -1 (the CPU) or a CUDA device index, got -3"),
])
def test_bad_training_settings_are_refused(capsys, grid_env, tmp_path, flag, value, message):
    out = tmp_path / "m.checkpoint"
    refused(capsys, train_main, ["--dataset", "cifar10", "--data-dir", str(grid_env[0]),
                                 "--out", str(out), flag, value], message, out)


def test_training_settings_are_validated_by_the_library():
    with pytest.raises(IntraFusionError, match="got --epochs 0"):
        TrainSettings("vgg11", "cifar10", epochs=0)
    with pytest.raises(IntraFusionError, match="--seed must lie in"):
        TrainSettings("vgg11", "cifar10", seed=2 ** 64)


SEED_COMMAND = ["--model-name", "vgg11_bn", "--group_idxs", "1", "2", "3",
                "--sparsities", "0.3", "0.4", "0.5", "0.6", "0.7", "--importance_criteria", "l1"]


def test_seed_command_without_checkpoint_says_where_cifar10_checkpoints_come_from(
        capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, main, SEED_COMMAND, "checkpoint models/vgg11_bn.checkpoint not found")
    assert "the authors' models.zip (unzip it into models/)" in err
    assert "--dataset fashion-mnist" in err


def test_seed_command_without_cifar10_data_says_what_runs_offline(capsys, grid_env, tmp_path, monkeypatch):
    def offline(url, target):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(data_module, "_download", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    shutil.copy(grid_env[1], tmp_path / "models" / "vgg11_bn.checkpoint")
    err = refused(capsys, main, SEED_COMMAND, "cifar10 not found and download failed")
    assert "data/cifar-10-batches-py/" in err
    assert "run the Fashion-MNIST checkpoints shipped in models.zip with --dataset fashion-mnist" in err
    assert not (tmp_path / "results" / "vgg11_bn_cifar10_l1.csv").exists()
