"""Reading and locating checkpoints in the authors' format {"model_state_dict", "test_accuracy", "epoch"}."""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import torch
from torch import nn

from ..errors import IntraFusionError
from ..storage import first_non_finite, load_tensors
from ..models import build_model

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
    try:
        with zipfile.ZipFile(archive) as zf:
            if member in zf.namelist():
                zf.extract(member, ".")
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise IntraFusionError(f"cannot extract {member} from {archive} ({exc}); fetch {archive} again "
                        "or pass --checkpoint") from None


def read_checkpoint(path: Path, dataset: str | None = None) -> dict:
    """Load a checkpoint dict with weights_only=True; IntraFusionError if it is not a checkpoint
    (for a missing one, `dataset` says where its checkpoints come from)."""
    path = Path(path)
    if not path.is_file():
        where = ("; the paper's CIFAR-10 checkpoints are the authors' models.zip (unzip it into "
                 "models/); the ones shipped with this project are Fashion-MNIST checkpoints, used "
                 "with --dataset fashion-mnist" if dataset == "cifar10" else "")
        raise IntraFusionError(f"checkpoint {path} not found: train one with train.py or pass "
                               f"--checkpoint{where}")
    hint = "pass a checkpoint written by train.py or the authors' models/<name>.checkpoint"
    data = load_tensors(path, hint)
    if not isinstance(data, dict) or "model_state_dict" not in data:
        raise IntraFusionError(f"{path} is not a checkpoint: expected a dict with 'model_state_dict'; {hint}")
    if not isinstance(data["model_state_dict"], dict):
        raise IntraFusionError(f"{path} is not a checkpoint: 'model_state_dict' is not a state dict; {hint}")
    return data


def load_weights(model: nn.Module, state: dict, source: Path | str) -> None:
    """Strictly load `state` into `model`; IntraFusionError naming the first mismatching key."""
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            raise IntraFusionError(f"{source} does not match the model: key {key!r} missing "
                            "(wrong architecture?)")
        if not isinstance(state[key], torch.Tensor):
            raise IntraFusionError(f"{source} does not match the model: key {key!r} is a "
                            f"{type(state[key]).__name__}, not a tensor")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise IntraFusionError(f"{source} does not match the model: key {key!r} has shape "
                            f"{tuple(state[key].shape)}, expected {tuple(expected[key].shape)} "
                            "(wrong architecture or number of classes?)")
    for key in state:
        if key not in expected:
            raise IntraFusionError(f"{source} does not match the model: unexpected key {key!r} "
                            "(wrong architecture?)")
    bad = first_non_finite(state)
    if bad is not None:
        raise IntraFusionError(f"{source} holds NaN or infinite values in tensor {bad!r}: the network "
                               "is broken (diverged training?); pass a checkpoint with finite weights")
    model.load_state_dict(state, strict=True)


def model_from_state(name: str, num_classes: int, state: dict, source: Path | str) -> nn.Module:
    """Model `name` built in the layout of `state` (models.build_model) with `state` loaded
    strictly (load_weights)."""
    model = build_model(name, num_classes, state=state)
    load_weights(model, state, source)
    return model
