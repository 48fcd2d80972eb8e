"""The trained checkpoints shipped in models.zip load strictly and are as accurate as recorded."""
import zipfile
from pathlib import Path

import pytest
import torch

from intrafusion.experiments import data
from intrafusion.experiments.checkpoints import MODELS_ZIP, model_from_state
from intrafusion.experiments.data import load_dataset
from intrafusion.evaluation import accuracy

ROOT = Path(__file__).resolve().parents[1]
ZIP = ROOT / MODELS_ZIP
SHIPPED = {"vgg11_bn": "models/fashion-mnist/vgg11_bn.checkpoint",
           "resnet18": "models/fashion-mnist/resnet18.checkpoint"}


def shipped(name):
    if not ZIP.is_file():
        pytest.skip("models.zip not present")
    with zipfile.ZipFile(ZIP) as zf:
        if SHIPPED[name] not in zf.namelist():
            pytest.skip(f"{SHIPPED[name]} not shipped yet")
        with zf.open(SHIPPED[name]) as f:
            return torch.load(f, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def fashion_subset():
    if not data.SYSTEM_FASHION_MNIST.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist")
    ds = load_dataset("fashion-mnist", ROOT / "data", download=False)
    return ds.test_tensors(limit=1000)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_checkpoint_matches_its_recorded_accuracy(name, fashion_subset):
    ckpt = shipped(name)
    assert {"model_state_dict", "test_accuracy", "epoch"} <= set(ckpt)
    model = model_from_state(name, 10, ckpt["model_state_dict"], SHIPPED[name])   # strict: every key and shape
    assert set(model.state_dict()) == set(ckpt["model_state_dict"])
    assert ckpt["test_accuracy"] >= 92.0
    measured = 100 * accuracy(model, *fashion_subset)
    assert abs(measured - ckpt["test_accuracy"]) <= 2.0
