"""Two small CIFAR-sized networks the pruning library was not written for.

`MobileNetV2Small` has inverted-residual blocks with depthwise convolutions (groups that cannot be
fused: a depthwise channel reads only its own input channel, so they are pruned the default way);
`MLPMixerSmall` mixes tokens and channels with Linear layers around LayerNorm (pruned by index,
its Linear layers fused) and residual streams. Inputs are 3×32×32 images. Build their pruners
with `Pruner(model, x, **pruner_options(model))`.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn


def _conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
             act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    """Expand 1×1 conv–BN–ReLU6 (skipped when expand == 1), depthwise 3×3 conv–BN–ReLU6,
    project 1×1 conv–BN; the input is added when stride is 1 and the width unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = _conv_bn(c_in, hidden) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, c_out, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2Small(nn.Module):
    """Stem conv, inverted-residual blocks given as (expand, width, stride), 1×1 head conv,
    global average pooling and a Linear classifier."""

    def __init__(self, num_classes: int = 10, stem: int = 16,
                 blocks=((1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1)),
                 head: int = 64):
        super().__init__()
        layers, c = _conv_bn(3, stem, 3), stem
        for expand, width, stride in blocks:
            layers.append(InvertedResidual(c, width, stride, expand))
            c = width
        layers += _conv_bn(c, head)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class SwapAxes(nn.Module):
    """x.transpose(1, 2); registered with torch-pruning as a boundary between channel axes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class SwapAxesPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning handler for SwapAxes: it has no weights, and distinct in/out functions
    (no intra-layer dependency) so the channel axis before the swap is not coupled with the
    channel axis after it. torch-pruning treats an unknown op as element-wise, which would
    couple the token axis of the token-mixing MLP with the embedding channels."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        return layer

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None


class TokenMLP(nn.Module):
    """Linear–GELU–Linear over the token axis of x (B, tokens, dim): swap, mix, swap back.
    `fc2` outputs tokens, so its width is fixed (see pruner_options)."""

    def __init__(self, tokens: int, hidden: int):
        super().__init__()
        self.swap_in, self.swap_out = SwapAxes(), SwapAxes()
        self.fc1, self.act, self.fc2 = nn.Linear(tokens, hidden), nn.GELU(), nn.Linear(hidden, tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swap_out(self.fc2(self.act(self.fc1(self.swap_in(x)))))


class MixerBlock(nn.Module):
    """x + token-MLP(LN(x)), then x + channel-MLP(LN(x)); x is (B, tokens, dim)."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = TokenMLP(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(),
                                         nn.Linear(channel_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x))
        return x + self.channel_mlp(self.norm2(x))


class MLPMixerSmall(nn.Module):
    """Patch-embedding conv (patch × patch, stride patch), mixer blocks, LayerNorm, mean over
    tokens and a Linear classifier."""

    def __init__(self, num_classes: int = 10, image: int = 32, patch: int = 4, dim: int = 32,
                 depth: int = 2, token_hidden: int = 32, channel_hidden: int = 64):
        super().__init__()
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, token_hidden, channel_hidden)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a plain transpose: torch-pruning treats it as element-wise, which is right here because
        # the embedding channels stay the channel axis of the token sequence
        x = self.embed(x).flatten(2).transpose(1, 2)           # (B, tokens, dim)
        x = self.norm(self.blocks(x))
        return self.classifier(x.mean(1))


def pruner_options(model: nn.Module) -> dict:
    """Keyword arguments for `Pruner(model, ...)`: a torch-pruning handler for SwapAxes and the
    token-mixing output layers as fixed-width layers; empty for models without SwapAxes."""
    if not any(isinstance(m, SwapAxes) for m in model.modules()):
        return {}
    fixed = [f"{name}.fc2" for name, m in model.named_modules() if isinstance(m, TokenMLP)]
    return {"fixed_layers": fixed, "customized_pruners": {SwapAxes: SwapAxesPruner()}}
