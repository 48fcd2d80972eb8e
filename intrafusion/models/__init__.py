"""The model zoo: one registry of every built-in architecture, by name.

`cifar` holds the paper's CIFAR-style VGG and ResNet families; `extra` two small networks the
library was not written for (MobileNetV2-style, MLP-Mixer); `hf` transformers classifiers (a
ViT built from a small config, BERT for tests). Images are 3×32×32.

The ResNet family comes in two checkpoint layouts: the authors' (every convolution has a bias,
the default for new models) and the bias-free one of the shipped Fashion-MNIST checkpoints;
`build_model(..., state=...)` builds the one that a state dict was saved from.

Language models have a registry of their own (`build_language_model`, `LANGUAGE_MODEL_NAMES`):
they map token ids to next-token logits, not images to classes. `llama_gqa` (lm.py) is the shipped
`python-stdlib` model's architecture, at the shipped size unless told otherwise.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .cifar import VGG, VGG_CONFIGS, BasicBlock, Bottleneck, ResNet
from . import extra, hf
from .extra import MLPMixerSmall, MobileNetV2Small
from .hf import HFClassifier, bert_classifier, vit_tiny
from .lm import llama_gqa
from ..errors import IntraFusionError


def _resnet(block: type, num_blocks: list[int]) -> Callable[..., nn.Module]:
    return lambda c, conv_bias=True: ResNet(block, num_blocks, c, conv_bias=conv_bias)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vgg11": lambda c: VGG(VGG_CONFIGS["vgg11"], c, batch_norm=False),
    "vgg11_bn": lambda c: VGG(VGG_CONFIGS["vgg11"], c),
    "vgg13_bn": lambda c: VGG(VGG_CONFIGS["vgg13"], c),
    "vgg16_bn": lambda c: VGG(VGG_CONFIGS["vgg16"], c),
    "vgg19_bn": lambda c: VGG(VGG_CONFIGS["vgg19"], c),
    "resnet18": _resnet(BasicBlock, [2, 2, 2, 2]),
    "resnet34": _resnet(BasicBlock, [3, 4, 6, 3]),
    "resnet50": _resnet(Bottleneck, [3, 4, 6, 3]),
    "mobilenetv2": lambda c: MobileNetV2Small(c),
    "mixer": lambda c: MLPMixerSmall(c),
    "vit_tiny": lambda c: vit_tiny(c),
}
MODEL_NAMES = tuple(_BUILDERS)
_TWO_LAYOUTS = ("resnet18", "resnet34", "resnet50")


def build_model(name: str, num_classes: int = 10, state: dict | None = None) -> nn.Module:
    """A freshly initialised model `name` (one of MODEL_NAMES) with `num_classes` outputs, in
    the layout `state` was saved from if given (a ResNet without conv biases when `state` has no
    `conv1.bias`), else in the authors' layout. Whether `state` then fits exactly is for
    experiments.checkpoints.load_weights to check."""
    if name not in _BUILDERS:
        raise IntraFusionError(f"unknown model name {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name in _TWO_LAYOUTS:
        return _BUILDERS[name](num_classes, conv_bias=state is None or "conv1.bias" in state)
    return _BUILDERS[name](num_classes)


_LANGUAGE_BUILDERS: dict[str, Callable[..., nn.Module]] = {"llama_gqa": llama_gqa}
LANGUAGE_MODEL_NAMES = tuple(_LANGUAGE_BUILDERS)


def build_language_model(name: str, vocab_size: int, **sizes) -> nn.Module:
    """A freshly initialised language model `name` (one of LANGUAGE_MODEL_NAMES) over
    `vocab_size` tokens; `sizes`: its builder's other arguments (context, widths)."""
    if name not in _LANGUAGE_BUILDERS:
        raise IntraFusionError(f"unknown language model name {name!r}; choose one of "
                               f"{', '.join(LANGUAGE_MODEL_NAMES)}")
    return _LANGUAGE_BUILDERS[name](vocab_size, **sizes)


def pruner_options(model: nn.Module) -> dict:
    """Keyword arguments for `Pruner(model, ...)`: the Mixer's (extra.pruner_options), a
    transformers model's (hf.pruner_options), empty for the other models."""
    return {**extra.pruner_options(model), **hf.pruner_options(model)}


__all__ = ["MODEL_NAMES", "build_model", "LANGUAGE_MODEL_NAMES", "build_language_model", "pruner_options",
           "VGG", "ResNet", "MobileNetV2Small", "MLPMixerSmall", "HFClassifier", "vit_tiny",
           "bert_classifier", "llama_gqa"]
