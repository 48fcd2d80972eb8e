"""Fixtures shared by the test files. Tests are in two tiers: `python -m pytest -m "not slow"`
runs the fast one; `slow` (registered in pytest.ini) marks subprocess kills, full-size
models, fuzzing and the shipped checkpoints; CI (.ci/run) runs both."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import calibrated_model, narrow_vggs, save_checkpoint, write_cifar

# Most tests compute on small tensors, where a second intra-op thread costs more than it saves
# (several times more on a busy machine); the slow full-size ones give up at most one core, and
# main.py started as a subprocess keeps torch's default.
torch.set_num_threads(1)


def _grid_files(root: Path) -> tuple[Path, Path]:
    """40 training and 30 test images in CIFAR-10's format under `root`/data and a vgg11_bn
    checkpoint whose BN statistics are measured on them."""
    data = root / "data"
    write_cifar(data, n_train=40, n_test=30)
    return data, save_checkpoint(calibrated_model("vgg11_bn", data), root / "vgg11_bn.checkpoint")


@pytest.fixture()
def narrow_vgg():
    """build_model gives the narrow VGG11 / VGG11-BN during the test (helpers.narrow_vggs)."""
    with narrow_vggs():
        yield


@pytest.fixture(scope="session")
def grid_files(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, checkpoint) of the narrow vgg11_bn; module fixtures that run main.py with
    it wrap their calls in helpers.narrow_vggs(). Shared by the whole session: tests write
    their outputs elsewhere and leave these untouched."""
    with narrow_vggs():
        return _grid_files(tmp_path_factory.mktemp("grid_env"))


@pytest.fixture()
def grid_env(grid_files, narrow_vgg) -> tuple[Path, Path]:
    """grid_files, with main.py (in this process) building the narrow vgg11_bn they fit."""
    return grid_files


@pytest.fixture(scope="session")
def full_grid_files(tmp_path_factory) -> tuple[Path, Path]:
    """The same data with a full-size vgg11_bn checkpoint, for main.py run as a subprocess."""
    return _grid_files(tmp_path_factory.mktemp("full_grid_env"))
