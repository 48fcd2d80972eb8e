"""Hugging Face `transformers` classifiers built from small configs (nothing is downloaded).

`HFClassifier` wraps a `*ForImageClassification` / `*ForSequenceClassification` model so that
`model(x)` returns the logits tensor, as every model of the registry does (x: pixel values
(B, 3, 32, 32) for the ViT, token ids (B, L) for BERT). After loading a state dict it brings the
attention modules' head counts and the config back in line with the loaded weights
(attention.sync_widths), so a pruned network rebuilt by intrafusion.load is consistent.

`transformers` is optional (the test extra): building one of these models without it is an
IntraFusionError naming the package to install.
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import sync_widths
from ..errors import IntraFusionError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise IntraFusionError("the transformers models need the transformers package: "
                               "pip install -r requirements.txt (or the 'test' extra)") from None
    return transformers


class HFClassifier(nn.Module):
    """`net(x).logits` of a transformers classification model `net`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_load_state_dict_post_hook(lambda module, _keys: sync_widths(module))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).logits


def vit_tiny(num_classes: int = 10, hidden: int = 48, layers: int = 3, heads: int = 4,
             intermediate: int = 96, patch: int = 8, image: int = 32) -> HFClassifier:
    """A ViTForImageClassification for 3×image×image inputs: patch×patch patches, `layers`
    encoder layers of width `hidden` with `heads` heads and MLPs of width `intermediate`, the
    class token's final state classified. The defaults are the shipped Fashion-MNIST model."""
    t = _transformers()
    config = t.ViTConfig(image_size=image, patch_size=patch, num_channels=3, hidden_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=intermediate, num_labels=num_classes,
                         head_dim=hidden // heads, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    return HFClassifier(t.ViTForImageClassification(config))


def bert_classifier(num_classes: int = 2, vocab: int = 100, hidden: int = 32, layers: int = 2,
                    heads: int = 4, intermediate: int = 64, max_length: int = 16) -> HFClassifier:
    """A BertForSequenceClassification over token ids (B, L ≤ max_length) from `vocab` tokens,
    the pooled [CLS] state classified; no dropout (deterministic outputs)."""
    t = _transformers()
    config = t.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=intermediate,
                          max_position_embeddings=max_length, num_labels=num_classes,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return HFClassifier(t.BertForSequenceClassification(config))


RESIDUAL_WRITERS = ("attention.o_proj", "attention.output.dense")  # ViT, BERT naming


def pruner_options(model: nn.Module) -> dict:
    """Keyword arguments for `Pruner(model, ...)`: the attention output projections as fixed-width
    layers, which leaves out the residual-stream group (the embedding width that every layer
    reads and writes, normalized by LayerNorms over all its channels, so removing some changes
    every LayerNorm's statistics); empty for a model without them."""
    fixed = [name for name, _ in model.named_modules() if name.endswith(RESIDUAL_WRITERS)]
    return {"fixed_layers": fixed} if fixed else {}
