"""Accuracy of a model on in-memory tensors, in large batches under inference mode, forward
passes with hooks on named layers (statistics, importance), and the chain of segments a model
splits into (a variant re-runs only the segments from its first changed one on)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Segment = tuple[tuple[str, ...], Callable[[nn.Module, torch.Tensor], torch.Tensor]]

# Images per evaluation batch (accuracy, the data-major evaluator, the grid and the profile). The
# CPU time per image is the same from 250 to 1,000 (VGG11-BN, ResNet18), but a batch's activations
# are 4× smaller: ResNet18's largest is 65 MB instead of 262 MB, so fewer and smaller buffers
# to map and zero, and a quarter of the peak memory of a forward pass.
EVAL_BATCH = 250


def count_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = EVAL_BATCH) -> int:
    """Number of images (N, 3, H, W) whose argmax prediction equals `labels` (N,)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            y = labels[start:start + batch_size].to(device, non_blocking=True)
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = EVAL_BATCH) -> float:
    """Fraction in [0, 1] of correctly classified images."""
    return count_correct(model, images, labels, batch_size) / max(len(labels), 1)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) as a tensor of logits: (B, classes), or (B, L, vocab) for a language model. A
    transformers model's output is a ModelOutput: its `.logits`, computed without a KV cache."""
    if callable(getattr(model, "can_generate", None)):
        return model(x, use_cache=False).logits
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def scored_pairs(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (predictions' logits (n, classes), targets (n,)) that a metric scores: the batch as it
    is for a classifier (out (B, classes), y (B,)); for a language model (out (B, L, vocab), y the
    token ids (B, L)) every position's logits against the next token."""
    if out.dim() == 3:
        return out[:, :-1].reshape(-1, out.shape[-1]), y[:, 1:].reshape(-1)
    return out, y


def scored_count(labels: torch.Tensor) -> int:
    """How many predictions a metric averages over: images (N,), or next tokens of (N, L) windows."""
    return labels[:, 1:].numel() if labels.dim() == 2 else len(labels)


def run_hooked(model: nn.Module, layer_names, make_hook, inputs, forward=None) -> None:
    """Forward every input through `model` in eval mode with make_hook(name) hooked on each
    named layer, by forward(x) (default model(x)); hooks removed and the training flag restored
    afterwards."""
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handles = [modules[n].register_forward_hook(make_hook(n)) for n in layer_names]
    try:
        for x in inputs:
            (forward or model)(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def model_segments(model: nn.Module) -> list[Segment] | None:
    """The chain of (module names, fn(model, x)) whose composition is model(x) (the logits), as
    the model supplies it through a `segments()` method, or as models.decoders knows it for a
    transformers decoder LM; None for any other model (full forward)."""
    segments = getattr(model, "segments", None)
    if callable(segments):
        return segments()
    from .models.decoders import decoder_segments
    return decoder_segments(model)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold the same parameters and buffers (names, shapes and values)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k])
                                          for k in sa)


def first_changed_segment(base: nn.Module, variant: nn.Module, segments: list[Segment]) -> int:
    """Index of the first segment whose parameters or buffers differ between the two models."""
    for i, (names, _) in enumerate(segments):
        if not all(same_state(base.get_submodule(n), variant.get_submodule(n)) for n in names):
            return i
    return len(segments) - 1
