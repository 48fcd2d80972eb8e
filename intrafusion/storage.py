"""Files a person can trust: read tensors without running code from the file, refuse unwritable
places before any work, write atomically, and turn a failed write (disk full, permissions) into an
IntraFusionError that says what to do."""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import IntraFusionError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _nearest_existing(path: Path) -> Path:
    for folder in path.parents:
        if folder.exists():
            return folder
    return Path(".")


def check_writable(path: Path | str) -> None:
    """IntraFusionError unless file `path` can be created (with its folders) or appended to.

    Creates nothing: the folder is probed with an anonymous temporary file."""
    path = Path(path)
    if path.is_dir():
        raise IntraFusionError(f"cannot write {path}: it is a directory; give a file name")
    folder = _nearest_existing(path)
    if not folder.is_dir():
        raise IntraFusionError(f"cannot write {path}: {folder} is not a directory; choose another path")
    try:
        if path.exists():
            open(path, "ab").close()
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise IntraFusionError(f"cannot write {path}: {folder} is not writable ({exc.strerror}); "
                        "fix its permissions or choose another path") from None


def write_failure(path: Path | str, exc: OSError, hint: str) -> IntraFusionError:
    """The IntraFusionError for an OSError raised while writing `path`; `hint` says how to go on."""
    if exc.errno in _NO_SPACE:
        return IntraFusionError(f"disk full while writing {path} ({exc.strerror}): free some space, "
                         f"then {hint}")
    return IntraFusionError(f"could not write {path} ({exc.strerror or exc}): {hint}")


def atomic_write(path: Path | str, data: bytes, hint: str) -> None:
    """Write `data` to a temporary file, fsync, then rename it over `path`: readers see the old
    file or the new one, never half of one. A failed write (disk full) leaves `path` as it was
    and raises IntraFusionError ending in `hint` (what to do next)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        if tmp.exists():
            tmp.unlink()
        raise write_failure(path, exc, hint) from None


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks (checksums of data and checkpoints)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


ZIP_MAGIC = b"PK\x03\x04"   # torch.save has written zip archives since torch 1.6


def _unreadable(exc: Exception, path: Path) -> str:
    """Why torch.load failed, in words a person can act on. A file that is not a zip archive is
    read by the legacy unpickler, which fails on arbitrary bytes with arbitrary exceptions."""
    if isinstance(exc, EOFError):
        return "the file is empty or truncated"
    try:
        with open(path, "rb") as f:
            zipped = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    except OSError:
        zipped = True   # unreadable: report torch's own error below
    if isinstance(exc, pickle.UnpicklingError):
        return ("it holds objects other than tensors" if zipped else
                "not a file saved by torch.save, or it holds objects other than tensors")
    if not zipped:
        return "not a file saved by torch.save"
    if isinstance(exc, (RuntimeError, zipfile.BadZipFile)) and "zip" in str(exc).lower():
        return "the file is truncated or corrupted"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_tensors(path: Path, hint: str):
    """torch.load(path, weights_only=True) onto the CPU, without warnings; an IntraFusionError ending in
    `hint` when the file cannot be read that way. Any exception counts: unpickling arbitrary bytes
    raises arbitrary ones (IndexError, struct.error, ...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to read the file means a bad file
        why = _unreadable(exc, path)
        raise IntraFusionError(f"{path} is not a readable checkpoint ({why}); {hint}") from None


def first_non_finite(state: dict) -> str | None:
    """The first key of `state` (in its order) whose tensor holds a NaN or ±Inf, else None."""
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value).all()):
                return key
    return None
