"""Evaluation of pruned variants for a grid (fast path: cached unpruned prefixes)."""
from __future__ import annotations

import torch

from .evaluation import accuracy


class GridEvaluator:
    """Accuracy of pruned copies of `base` on the test tensors (N, 3, H, W), (N,)."""

    def __init__(self, base, images: torch.Tensor, labels: torch.Tensor, fast: bool = True):
        self.base, self.images, self.labels, self.fast = base, images, labels, fast

    def accuracy(self, variant, groups) -> float:
        """Test accuracy of `variant` (a pruned copy of base) whose `groups` were pruned."""
        return accuracy(variant.model, self.images, self.labels)
