"""A tiny CIFAR-format data set and vgg11_bn checkpoints for running main.py in tests."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn

from helpers import write_cifar
from intrafusion.experiments.data import load_dataset
from intrafusion.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def calibrated_model(name: str, data_dir: Path, classes: int = 10, seed: int = 0) -> nn.Module:
    """A random model whose BN statistics are measured on the data, so its predictions vary
    with the input (and pruning changes them) instead of being one constant class."""
    torch.manual_seed(seed)
    model = build_model(name, classes)
    ds = load_dataset("cifar10", data_dir, download=False)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()(ds.normalize(torch.cat([ds.train_images, ds.test_images])))
        head = model.classifier if hasattr(model, "classifier") else model.linear
        head.bias.zero_()
    return model.eval()


def save_checkpoint(model: nn.Module, path: Path) -> Path:
    torch.save({"model_state_dict": model.state_dict(), "test_accuracy": 10.0, "epoch": 1}, path)
    return path


def make_env(root: Path) -> tuple[Path, Path]:
    """Data folder (40 train, 30 test images) and a vgg11_bn checkpoint under `root`."""
    data = root / "data"
    write_cifar(data, n_train=40, n_test=30)
    return data, save_checkpoint(calibrated_model("vgg11_bn", data), root / "vgg11_bn.checkpoint")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "prune_seconds"} for r in rows]


def cells(rows: list[dict]) -> list[tuple]:
    return [(r["criterion"], r["group"], r["sparsity"], r["method"]) for r in rows]
