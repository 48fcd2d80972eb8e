"""Reading and locating checkpoints in the authors' format {"model_state_dict", "test_accuracy", "epoch"}."""
from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

MODELS_ZIP = Path("models.zip")


def default_checkpoint(model_name: str, dataset: str, root: Path = Path("models")) -> Path:
    """CIFAR-10 keeps the authors' layout models/<name>.checkpoint; others models/<dataset>/."""
    if dataset == "cifar10":
        return root / f"{model_name}.checkpoint"
    return root / dataset / f"{model_name}.checkpoint"


def ensure_unzipped(path: Path, archive: Path = MODELS_ZIP) -> None:
    """If `path` is missing but `archive` holds it, extract it (first use after a clone)."""
    if path.exists() or not archive.is_file():
        return
    member = path.as_posix()
    with zipfile.ZipFile(archive) as zf:
        if member in zf.namelist():
            zf.extract(member, ".")


def file_digest(path: Path) -> str:
    """sha256 of a file, to tell whether results were computed from the same checkpoint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint dict with weights_only=True; UserError if it is not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one with train.py or pass --checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile,
            AttributeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    if not isinstance(data, dict) or "model_state_dict" not in data:
        raise UserError(f"{path} is not a checkpoint: expected a dict with 'model_state_dict'")
    if not isinstance(data["model_state_dict"], dict):
        raise UserError(f"{path} is not a checkpoint: 'model_state_dict' is not a state dict")
    return data


def load_weights(model: nn.Module, state: dict, source: Path | str) -> None:
    """Strictly load `state` into `model`; UserError naming the first mismatching key."""
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            raise UserError(f"{source} does not match the model: key {key!r} missing "
                            "(wrong architecture?)")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise UserError(f"{source} does not match the model: key {key!r} has shape "
                            f"{tuple(state[key].shape)}, expected {tuple(expected[key].shape)} "
                            "(wrong architecture or number of classes?)")
    for key in state:
        if key not in expected:
            raise UserError(f"{source} does not match the model: unexpected key {key!r} "
                            "(wrong architecture?)")
    model.load_state_dict(state, strict=True)
