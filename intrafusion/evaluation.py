"""Accuracy of a model on in-memory tensors, in large batches under inference mode, and
forward passes with hooks on named layers (statistics, importance)."""
from __future__ import annotations

import torch
from torch import nn


def count_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 1000) -> int:
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
             batch_size: int = 1000) -> float:
    """Fraction in [0, 1] of correctly classified images."""
    return count_correct(model, images, labels, batch_size) / max(len(labels), 1)


def run_hooked(model: nn.Module, layer_names, make_hook, inputs) -> None:
    """Forward every input through `model` in eval mode with make_hook(name) hooked on each
    named layer; hooks removed and the training flag restored afterwards."""
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handles = [modules[n].register_forward_hook(make_hook(n)) for n in layer_names]
    try:
        for x in inputs:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
