"""Fold BatchNorm into the convolution or linear layer that feeds it.

For a layer y = W x + b followed by BN with scale γ, shift β, running mean μ and variance σ², the
pair computes s ⊙ (W x + b − μ) + β with s = γ / √(σ² + eps). Folding writes
W' = s · W (per output channel), b' = (b − μ) · s + β into the layer and turns the BN into an
identity (γ = 1, β = 0, μ = 0, σ² = 1 − eps), so importance and the transport map see the
function the network really computes.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import IntraFusionError
from .fusion import FUSABLE_LAYERS

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def fold_batchnorm(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold `bn` into `layer` in place (same Parameter objects; a bias is created if missing)."""
    if not isinstance(layer, FUSABLE_LAYERS) or not isinstance(bn, _BATCHNORMS):
        raise TypeError(f"cannot fold {type(bn).__name__} into {type(layer).__name__}")
    weight = layer.weight
    if bn.running_mean is None:
        raise IntraFusionError("cannot fold a BatchNorm without running statistics")
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                              device=weight.device))
    layer.bias.copy_((layer.bias - bn.running_mean) * scale + beta)
    weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    if bn.affine:
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def conv_bn_pairs(graph) -> list[tuple[nn.Module, nn.Module]]:
    """(layer, bn) pairs of a torch-pruning DependencyGraph where the BN reads only that layer's
    output and the layer feeds nothing else."""
    pairs = []
    for module, node in graph.module2node.items():
        if not isinstance(module, _BATCHNORMS) or len(node.inputs) != 1:
            continue
        producer = node.inputs[0]
        if isinstance(producer.module, FUSABLE_LAYERS) and len(producer.outputs) == 1:
            if getattr(producer.module, "transposed", False):
                continue
            pairs.append((producer.module, module))
    return pairs


def fold_all_batchnorms(graph) -> int:
    """Fold every foldable BN of the graph's model in place; return how many were folded."""
    pairs = conv_bn_pairs(graph)
    for layer, bn in pairs:
        fold_batchnorm(layer, bn)
    return len(pairs)
