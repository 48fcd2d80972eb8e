"""Accuracy of a model on in-memory tensors, in large batches under inference mode."""
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
