"""The model zoo: one registry of every built-in architecture, by name.

`cifar` holds the paper's CIFAR-style VGG and ResNet families; `extra` two small networks the
library was not written for (MobileNetV2-style, MLP-Mixer); `hf` transformers classifiers (a
ViT built from a small config, BERT for tests). Images are 3×32×32.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .cifar import VGG, VGG_CONFIGS, BasicBlock, Bottleneck, ResNet
from . import extra, hf
from .extra import MLPMixerSmall, MobileNetV2Small
from .hf import HFClassifier, bert_classifier, vit_tiny
from ..errors import IntraFusionError

_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "vgg11": lambda c: VGG(VGG_CONFIGS["vgg11"], c, batch_norm=False),
    "vgg11_bn": lambda c: VGG(VGG_CONFIGS["vgg11"], c),
    "vgg13_bn": lambda c: VGG(VGG_CONFIGS["vgg13"], c),
    "vgg16_bn": lambda c: VGG(VGG_CONFIGS["vgg16"], c),
    "vgg19_bn": lambda c: VGG(VGG_CONFIGS["vgg19"], c),
    "resnet18": lambda c: ResNet(BasicBlock, [2, 2, 2, 2], c),
    "resnet34": lambda c: ResNet(BasicBlock, [3, 4, 6, 3], c),
    "resnet50": lambda c: ResNet(Bottleneck, [3, 4, 6, 3], c),
    "mobilenetv2": lambda c: MobileNetV2Small(c),
    "mixer": lambda c: MLPMixerSmall(c),
    "vit_tiny": lambda c: vit_tiny(c),
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model `name` (one of MODEL_NAMES) with `num_classes` outputs."""
    if name not in _BUILDERS:
        raise IntraFusionError(f"unknown model name {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes)


def pruner_options(model: nn.Module) -> dict:
    """Keyword arguments for `Pruner(model, ...)`: the Mixer's (extra.pruner_options), a
    transformers model's (hf.pruner_options), empty for the other models."""
    return {**extra.pruner_options(model), **hf.pruner_options(model)}


__all__ = ["MODEL_NAMES", "build_model", "pruner_options", "VGG", "ResNet", "MobileNetV2Small",
           "MLPMixerSmall", "HFClassifier", "vit_tiny", "bert_classifier"]
