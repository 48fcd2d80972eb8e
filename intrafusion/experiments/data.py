"""Datasets as in-memory tensors: CIFAR-10/100 (python-pickle batches) and Fashion-MNIST (idx).

Images are kept as uint8 tensors of shape (N, C, 32, 32); `Dataset.normalize` turns a batch into
float32 (N, 3, 32, 32). Fashion-MNIST is zero-padded by 2 to 32×32 and repeated to 3 channels so
the CIFAR models apply unchanged.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import pickle
import shutil
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import IntraFusionError
from ..storage import file_digest

DATASET_NAMES = ("cifar10", "cifar100", "fashion-mnist")
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_CIFAR = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels", classes=10, train_size=50000),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"], label_key=b"fine_labels", classes=100,
                     train_size=50000),
}
CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# sha256 of the *decompressed* idx payloads, so both the official and Debian's re-gzipped files pass.
_FMNIST_FILES = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}
FMNIST_MEAN, FMNIST_STD = (0.2860,) * 3, (0.3530,) * 3


@dataclass
class Dataset:
    """Train and test split as uint8 images (N, C, 32, 32) and int64 labels (N,)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple
    std: tuple
    num_classes: int

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, 32, 32) -> float32 (N, 3, 32, 32), scaled to [0, 1] and standardised."""
        x = images.float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def test_tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (first `limit`) normalized test images (N, 3, 32, 32) and labels (N,)."""
        images, labels = self.test_images[:limit], self.test_labels[:limit]
        return self.normalize(images), labels


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a uint8 batch (N, C, H, W)."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    cropped = padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped).contiguous()


def train_batches(dataset: Dataset, batch_size: int, generator: torch.Generator,
                  augmented: bool = True):
    """Yield shuffled, optionally augmented, normalized training batches (x, y)."""
    order = torch.randperm(len(dataset.train_labels), generator=generator)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        images = dataset.train_images[idx]
        if augmented:
            images = augment(images, generator)
        yield dataset.normalize(images), dataset.train_labels[idx]


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """Load dataset `name` (one of DATASET_NAMES) from `data_dir` (default ./data)."""
    root = Path(data_dir) if data_dir is not None else Path("data")
    if name in _CIFAR:
        return _load_cifar(name, root, download)
    if name == "fashion-mnist":
        return _load_fashion_mnist(root, download)
    raise IntraFusionError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
        shutil.copyfileobj(response, f)
    partial.replace(target)


_OFFLINE_HINT = ("without CIFAR, run the Fashion-MNIST checkpoints shipped in models.zip with "
                 "--dataset fashion-mnist")


def _load_cifar(name: str, root: Path, download: bool) -> Dataset:
    spec = _CIFAR[name]
    folder = root / spec["folder"]
    needed = spec["train"] + spec["test"]
    if not all((folder / f).is_file() for f in needed):
        archive = root / Path(spec["url"]).name
        if not archive.is_file():
            if not download:
                raise IntraFusionError(f"{name} not found: put the python-pickle batches in {folder}/ "
                                f"or {archive.name} in {root}/; {_OFFLINE_HINT}")
            try:
                _download(spec["url"], archive)
            except (OSError, http.client.HTTPException) as exc:
                raise IntraFusionError(f"{name} not found and download failed ({exc}): put the files "
                                f"from {spec['url']} in {root}/ (unpacked to {folder}/); "
                                f"{_OFFLINE_HINT}") from None
        if file_digest(archive, "md5") != spec["md5"]:
            raise IntraFusionError(f"corrupt dataset file {archive}: md5 checksum mismatch; delete it "
                            f"and download {spec['url']} again")
        try:
            with tarfile.open(archive) as tar:
                # the md5-checked official archive; the "data" filter where Python has it (3.11.4+)
                tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (OSError, tarfile.TarError) as exc:
            raise IntraFusionError(f"could not unpack {archive} into {root} ({exc}); free some space or "
                            f"unpack it yourself to {folder}/") from None
    train = [_read_cifar_batch(folder / f, spec["label_key"]) for f in spec["train"]]
    test = [_read_cifar_batch(folder / f, spec["label_key"]) for f in spec["test"]]
    return Dataset(name, torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]),
                   torch.cat([x for x, _ in test]), torch.cat([y for _, y in test]),
                   CIFAR_MEAN, CIFAR_STD, spec["classes"])


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and plain containers: a CIFAR batch never needs
    more, and refusing every other global means a crafted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR pickle batch -> uint8 images (N, 3, 32, 32), int64 labels (N,), building
    nothing but arrays and containers (_ArraysOnly)."""
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="bytes").load()
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except Exception as exc:  # any failure to parse means the file is not a CIFAR batch
        raise IntraFusionError(f"corrupt dataset file {path}: {type(exc).__name__}: {exc}; "
                        "delete it and download the dataset again") from None
    if len(images) != len(labels):
        raise IntraFusionError(f"corrupt dataset file {path}: {len(images)} images but "
                        f"{len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def _fashion_mnist_payload(stem: str, root: Path, download: bool) -> bytes:
    """Return the decompressed idx file `stem`, checked against its known size and sha256."""
    sha, size = _FMNIST_FILES[stem]
    candidates = [root / "fashion-mnist" / f"{stem}.gz", root / f"{stem}.gz",
                  SYSTEM_FASHION_MNIST / f"{stem}.gz"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if not download:
            raise IntraFusionError(f"fashion-mnist file {stem}.gz not found: put it in {root}/ or "
                            f"install the Debian package dataset-fashion-mnist")
        path = candidates[0]
        try:
            _download(_FMNIST_URL + f"{stem}.gz", path)
        except (OSError, http.client.HTTPException) as exc:
            raise IntraFusionError(f"fashion-mnist file {stem}.gz not found and download failed ({exc}):"
                            f" put it in {root}/ or run `apt-get install dataset-fashion-mnist`"
                            ) from None
    try:
        payload = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise IntraFusionError(f"corrupt dataset file {path}: {exc}; delete it and fetch it again") from None
    if len(payload) != size or hashlib.sha256(payload).hexdigest() != sha:
        raise IntraFusionError(f"corrupt dataset file {path}: size or sha256 checksum mismatch; delete it "
                        "and fetch it again")
    return payload


def _load_fashion_mnist(root: Path, download: bool) -> Dataset:
    def images(stem):
        raw = np.frombuffer(_fashion_mnist_payload(stem, root, download), np.uint8, offset=16)
        x = torch.from_numpy(raw.reshape(-1, 1, 28, 28).copy())
        return torch.nn.functional.pad(x, (2, 2, 2, 2))

    def labels(stem):
        raw = np.frombuffer(_fashion_mnist_payload(stem, root, download), np.uint8, offset=8)
        return torch.from_numpy(raw.astype(np.int64))

    return Dataset("fashion-mnist", images("train-images-idx3-ubyte"),
                   labels("train-labels-idx1-ubyte"), images("t10k-images-idx3-ubyte"),
                   labels("t10k-labels-idx1-ubyte"), FMNIST_MEAN, FMNIST_STD, 10)
