"""CIFAR-style VGG and ResNet models.

Parameter names match the authors' checkpoints (`features.N.*`/`classifier.*` for VGG,
`conv1/bn1/layerN.M.*/linear` for ResNet), so their `models/<name>.checkpoint` files load with
strict key checking. The authors' ResNets give every convolution a bias (stem, block convs and
shortcut); `conv_bias=False` builds the bias-free layout of the Fashion-MNIST checkpoints shipped
here. A bias followed by BatchNorm only shifts the BN's running mean, so both layouts compute the
same functions. Inputs are 3×32×32 images.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def _module_step(name: str):
    return lambda model, x: model.get_submodule(name)(x)


class VGG(nn.Module):
    """VGG for 32×32 inputs: conv(3×3)[/BN]/ReLU blocks with max-pooling, one Linear classifier."""

    def __init__(self, config: list, num_classes: int = 10, batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(channels, item, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU(inplace=True))
            channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def segments(self) -> list:
        """The chain (module names, fn(model, x)) whose composition is forward: each `features`
        module, then the classifier (see evaluator.py)."""
        segs = [((f"features.{i}",), _module_step(f"features.{i}")) for i in range(len(self.features))]
        segs.append((("classifier",), lambda m, x: m.classifier(torch.flatten(x, 1))))
        return segs


def _shortcut(in_planes: int, out_planes: int, stride: int, bias: bool) -> nn.Sequential:
    """Identity when the shapes agree, else a strided 1×1 conv + BN (`shortcut.0`, `shortcut.1`)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=bias),
                         nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, conv_bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, conv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, conv_bias: bool = True):
        super().__init__()
        width = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=conv_bias)
        self.bn3 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(in_planes, width, stride, conv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for 32×32 inputs: 3×3 stem without pooling, four stages, global average pool.
    `conv_bias`: every convolution has a bias (the authors' layout) or none."""

    def __init__(self, block: type, num_blocks: list[int], num_classes: int = 10,
                 conv_bias: bool = True):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1, conv_bias)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2, conv_bias)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2, conv_bias)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2, conv_bias)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block: type, planes: int, count: int, stride: int,
                    conv_bias: bool) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (count - 1):
            layers.append(block(self.in_planes, planes, s, conv_bias))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))

    def segments(self) -> list:
        """The chain (module names, fn(model, x)) whose composition is forward: stem, each
        residual block, head (see evaluator.py)."""
        segs = [(("conv1", "bn1"), lambda m, x: F.relu(m.bn1(m.conv1(x))))]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            segs += [((f"{stage}.{i}",), _module_step(f"{stage}.{i}"))
                     for i in range(len(self.get_submodule(stage)))]
        segs.append((("linear",), lambda m, x: m.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))))
        return segs
