"""ONNX export of a (pruned) network: a smaller network is only worth something where it is
deployed, and ONNX Runtime is where many deploy it.

The file has one input `input` and one output `logits`, both with a dynamic batch axis; the
graph comes from torch.export (torch's default ONNX exporter; the TorchScript one is deprecated),
is verified by onnx.checker (with shape inference) and written atomically, so a failed export
never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import IntraFusionError
from .storage import atomic_write, check_writable

INPUT_NAME, OUTPUT_NAME = "input", "logits"


class Logits(nn.Module):
    """`model` with one tensor output: the `logits` of a Hugging Face ModelOutput, or the tensor
    the model returns (the ONNX graph then has a single output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if torch.is_tensor(out):
            return out
        logits = getattr(out, "logits", None)
        if not torch.is_tensor(logits):
            raise IntraFusionError(f"the model returns {type(out).__name__}, not a tensor nor an "
                                   "output with .logits; wrap it so that it returns one tensor")
        return logits


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that do not concern the user (torchvision kernels it skips,
    its own deprecations), for the duration of one export."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        onnx_logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    """The first line of the innermost cause of `exc` (the exporter wraps the real error)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def onnx_model(model: nn.Module, example: torch.Tensor):
    """The checked onnx.ModelProto of `model` (in eval mode) traced on `example` (N, ...), with a
    dynamic batch axis; the train/eval mode of each of its modules is left as it was."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it; say so before tracing)
    except ImportError as exc:
        raise IntraFusionError(f"ONNX export needs the onnx and onnxscript packages ({exc.name} is "
                               "missing): pip install -r requirements.txt") from None
    if not torch.is_tensor(example) or example.dim() < 1:
        raise IntraFusionError("the example must be a tensor batch (N, ...) the model accepts")
    name = type(model).__name__
    modes = {module: module.training for module in model.modules()}
    wrapped = Logits(model).eval()
    try:
        with torch.inference_mode():  # a plain run first: its errors are clearer than the tracer's
            try:
                wrapped(example)
            except IntraFusionError:
                raise
            except Exception as exc:
                raise IntraFusionError(f"{name} does not run on the example of shape "
                                       f"{tuple(example.shape)}: {_first_line(exc)}") from None
        with _quiet_exporter():
            try:
                program = torch.onnx.export(
                    wrapped, (example,), dynamo=True, external_data=False, verbose=False,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: torch.export.Dim("batch")},))
            except Exception as exc:  # the exporter raises many types; one line says why
                raise IntraFusionError(f"cannot export {name} to ONNX: {_first_line(exc)}") from None
    finally:
        for module, training in modes.items():
            module.training = training
    proto = program.model_proto
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise IntraFusionError(f"the ONNX graph of {name} is invalid: {_first_line(exc)}") from None
    return proto


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path | str) -> Path:
    """Write `model` as an ONNX file at `path` and return the path.

    example: a batch (N, ...) the model accepts, e.g. (1, 3, 32, 32); the file accepts any batch
    size. Hugging Face models export their logits. Bad input (an unwritable path, a model the
    exporter cannot trace) raises a one-line IntraFusionError; nothing is written then."""
    path = Path(path)
    check_writable(path)
    data = onnx_model(model, example).SerializeToString()
    atomic_write(path, data, "choose another path for the ONNX file")
    return path
