"""Multi-head attention in Hugging Face `transformers` models: whole heads as pruning units.

An attention module splits the outputs of its query/key/value projections into heads of
`head_dim` features (`view(..., -1, head_dim)`), so their width must stay a multiple of head_dim
and the three must keep the same heads. torch-pruning's dependency graph already couples the
out-channels of q, k and v with the in-channels of the output projection; pruning them channel
by channel breaks the head dimension. `Pruner` therefore prunes such a group in units of one
head: a head's score is the mean of its channels' scores, and every channel of a removed head
goes (see Pruner.prune_group).

Heads are pruned whole, the default way, also for Intra-Fusion: a head computes
softmax(q·kᵀ/√d)·v, so an average of two heads' q and k weights does not average their attention
maps (the product mixes them, and the softmax is not linear), and the features within a head are
only defined up to a rotation shared by q and k (and another one shared by v and the output
projection), so matching head feature vectors coordinate by coordinate compares arbitrary bases.

Recognised modules (transformers' naming): a module with an int `head_dim` (ViT, Llama style)
or `attention_head_size` (BERT style) and Linear children `q_proj/k_proj/v_proj` or
`query/key/value`. After pruning, `sync_widths` writes the new head counts into those modules
(`num_attention_heads`, `all_head_size`) and into the model's config where all layers agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
HEAD_DIM_ATTRIBUTES = ("head_dim", "attention_head_size")
INTERMEDIATE_NAMES = ("mlp.fc1", "intermediate.dense")  # the MLP's first layer (ViT, BERT)


@dataclass(frozen=True)
class Attention:
    """An attention module `name`, the full names of its q/k/v Linear layers, its head size."""

    name: str
    qkv: tuple[str, str, str]
    head_dim: int


def _head_dim(module: nn.Module) -> int | None:
    for attribute in HEAD_DIM_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def find_attention(model: nn.Module) -> list[Attention]:
    """Every recognised attention module of `model` (see the module docstring), in order."""
    found = []
    for name, module in model.named_modules():
        head_dim = _head_dim(module)
        if head_dim is None:
            continue
        for names in QKV_NAMES:
            layers = [getattr(module, n, None) for n in names]
            if all(isinstance(m, nn.Linear) and m.out_features % head_dim == 0 for m in layers):
                prefix = f"{name}." if name else ""
                found.append(Attention(name, tuple(prefix + n for n in names), head_dim))
                break
    return found


def head_dims(model: nn.Module) -> dict[str, int]:
    """{name of a q/k/v Linear: its head size} over every recognised attention module."""
    return {layer: a.head_dim for a in find_attention(model) for layer in a.qkv}


def unit_scores(scores: torch.Tensor, unit: int) -> torch.Tensor:
    """(n // unit,) mean score of each run of `unit` consecutive channels of scores (n,)."""
    return scores.view(-1, unit).mean(1)


def unit_channels(units: torch.Tensor, unit: int) -> torch.Tensor:
    """(len(units)·unit,) sorted channel indices of the given units (e.g. heads) (m,)."""
    channels = units.view(-1, 1) * unit + torch.arange(unit)
    return torch.sort(channels.flatten()).values


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and len(set(values)) == 1 else None


def _configured(model: nn.Module) -> list[nn.Module]:
    """The outermost submodules of `model` (itself included) holding a transformers config."""
    found, inside = [], set()
    for module in model.modules():
        if id(module) not in inside and hasattr(getattr(module, "config", None), "num_attention_heads"):
            found.append(module)
            inside |= {id(m) for m in module.modules()}
    return found


@torch.no_grad()
def sync_widths(model: nn.Module) -> None:
    """Make the attention modules' head counts and every transformers config inside `model`
    agree with the weights, in place: `num_attention_heads` (and `all_head_size`) per attention
    module from its query width; in the config, `num_attention_heads` and `intermediate_size`
    when all layers have the same, `hidden_size` from the first LayerNorm, and `head_dim` for
    ViT-style modules (so that the config rebuilds the pruned shapes when the layers agree)."""
    for net in _configured(model):
        config, heads = net.config, []
        for a in find_attention(net):
            attention, query = net.get_submodule(a.name), net.get_submodule(a.qkv[0])
            count = query.weight.shape[0] // a.head_dim
            attention.num_attention_heads = count
            if hasattr(attention, "all_head_size"):
                attention.all_head_size = count * a.head_dim
            if getattr(attention, "head_dim", None) == a.head_dim:
                config.head_dim = a.head_dim
            heads.append(count)
        widths = [m.weight.shape[0] for n, m in net.named_modules() if n.endswith(INTERMEDIATE_NAMES)]
        norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
        for key, value in (("num_attention_heads", _uniform(heads)),
                           ("intermediate_size", _uniform(widths)),
                           ("hidden_size", norms[0].normalized_shape[0] if norms else None)):
            if value is not None:
                setattr(config, key, value)
