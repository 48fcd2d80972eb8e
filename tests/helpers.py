"""Small models, generated data, checkpoints and CSV rows shared by the tests (the fixtures
built from them are in conftest.py)."""
from __future__ import annotations

import csv
import itertools
import os
import pickle
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def randomize_batchnorms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so folding is exercised."""
    g = generator or torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class TinyVGG(nn.Module):
    """conv-BN-ReLU ×3 with pooling and a linear head: 3 groups (2, 1, 0 from the input)."""

    def __init__(self, widths=(8, 12, 16), num_classes=10, bn=True, bias=True):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=bias)]
            layers += [nn.BatchNorm2d(w)] if bn else []
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * 4, num_classes)  # 16×16 input, 3 pools: 2×2 map

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def write_cifar(root: Path, n_train: int = 40, n_test: int = 20, classes: int = 10, seed: int = 0,
                name: str = "cifar10") -> Path:
    """Write CIFAR python-pickle batches in the exact format of the real archives."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        splits = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
        key = b"labels"
    else:
        folder = root / "cifar-100-python"
        splits = {"train": n_train, "test": n_test}
        key = b"fine_labels"
    folder.mkdir(parents=True, exist_ok=True)
    for fname, count in splits.items():
        entry = {b"batch_label": fname.encode(), key: rng.integers(0, classes, count).tolist(),
                 b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(count)]}
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f)
    return folder


class TinyResNet(nn.Module):
    """Stem + two residual blocks (identity, then strided with a 1×1 shortcut) + linear head."""

    def __init__(self, width=8, num_classes=10, bn=True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1, bias=not bn), norm(width)
        self.a1, self.abn1 = nn.Conv2d(width, width, 3, padding=1, bias=not bn), norm(width)
        self.a2, self.abn2 = nn.Conv2d(width, width, 3, padding=1, bias=not bn), norm(width)
        self.b1, self.bbn1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=not bn), norm(2 * width)
        self.b2, self.bbn2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=not bn), norm(2 * width)
        self.short = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=not bn), norm(2 * width))
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(out + self.abn2(self.a2(torch.relu(self.abn1(self.a1(out))))))
        out = torch.relu(self.short(out) + self.bbn2(self.b2(torch.relu(self.bbn1(self.b1(out))))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


NARROW_VGG11 = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]


def _narrow_builders() -> dict:
    from intrafusion.models import VGG
    return {"vgg11": lambda c: VGG(NARROW_VGG11, c, batch_norm=False),
            "vgg11_bn": lambda c: VGG(NARROW_VGG11, c)}


@contextmanager
def narrow_vggs():
    """Within the block, build_model("vgg11") and build_model("vgg11_bn") build VGG11 at 1/8 of
    its widths: the same 8 groups, layer names and segments for 1/64 of the work, so tests of
    main.py and train.py run in this process in a fraction of a second per cell."""
    import pytest
    from intrafusion import models
    with pytest.MonkeyPatch.context() as patch:
        for name, builder in _narrow_builders().items():
            patch.setitem(models._BUILDERS, name, builder)
        yield


def use_narrow_vggs() -> None:
    """narrow_vggs() for the rest of the process: the setup of a worker process computing cells
    of the narrow VGG (parallel.worker_setup)."""
    from intrafusion import models
    models._BUILDERS.update(_narrow_builders())


def narrow_and_killed(tokens: Path, chunk: int, times: int) -> None:
    """use_narrow_vggs(), and a worker process starting to evaluate its `chunk`-th chunk (or
    shard of one) kills itself with SIGKILL while one of `times` token files in the folder
    `tokens` is left to claim: a worker dying mid-grid, deterministically (`times` deaths in all)."""
    use_narrow_vggs()
    from intrafusion.evaluator import GridEvaluator
    evaluate, count = GridEvaluator.evaluate, itertools.count(1)

    def dying(self, *args, **kwargs):
        if next(count) == chunk:
            for i in range(times):
                try:
                    os.close(os.open(tokens / str(i), os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    continue
                os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(self, *args, **kwargs)

    GridEvaluator.evaluate = dying


def calibrated_model(name: str, data_dir: Path, classes: int = 10, seed: int = 0) -> nn.Module:
    """A random built-in model whose BN statistics are measured on the CIFAR-format data in
    `data_dir`, so its predictions vary with the input (and pruning changes them) instead of
    being one constant class."""
    from intrafusion.experiments.data import load_dataset
    from intrafusion.models import build_model
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
    """`model` in the authors' checkpoint format, as main.py reads it."""
    torch.save({"model_state_dict": model.state_dict(), "test_accuracy": 10.0, "epoch": 1}, path)
    return path


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    """Rows without prune_seconds, the one column that differs between identical runs."""
    return [{k: v for k, v in r.items() if k != "prune_seconds"} for r in rows]


def cells(rows: list[dict]) -> list[tuple]:
    """The (criterion, group, sparsity, method) key of each row."""
    return [(r["criterion"], r["group"], r["sparsity"], r["method"]) for r in rows]


def failing_worker() -> None:
    """A worker process's setup that fails the way the library does: an IntraFusionError."""
    from intrafusion.errors import IntraFusionError
    raise IntraFusionError("this worker cannot compute the cells")
