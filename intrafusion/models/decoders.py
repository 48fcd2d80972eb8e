"""transformers decoder language models recognised by their structure, and the chain of segments
their forward pass splits into (for the data-major evaluator and the cached repair inputs).

A decoder layer is recognised from its children's names and weight shapes, without importing
transformers: Llama style (Llama, Mistral, Qwen2, Qwen3, ...: `self_attn` with Linear
q/k/v/o_proj and int `head_dim` / `num_key_value_groups`, `mlp` with Linear gate/up/down_proj) and
GPT-2 style (`attn` with Conv1D c_attn / c_proj and int `num_heads` / `head_dim` / `split_size`,
`mlp` with Conv1D c_fc / c_proj; a Conv1D's weight is (in, out)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Block:
    """A recognised decoder layer: its module name, family ("llama" or "gpt2"), and the names of
    its attention and MLP modules."""

    name: str
    family: str
    attention: str
    mlp: str


def is_conv1d(module) -> bool:
    """transformers' Conv1D (weight (nx, nf), bias (nf,)), recognised without importing it."""
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def positive_int(module, name: str) -> int | None:
    """The attribute `name` of `module` if it is a positive int, else None."""
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _children(module: nn.Module, names, kind) -> bool:
    return all(kind(getattr(module, n, None)) for n in names)


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear)


def _llama_block(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    if not _children(attn, ("q_proj", "k_proj", "v_proj", "o_proj"), _is_linear):
        return False
    if not _children(mlp, ("gate_proj", "up_proj", "down_proj"), _is_linear):
        return False
    d, rep = positive_int(attn, "head_dim"), positive_int(attn, "num_key_value_groups")
    return (d is not None and rep is not None and attn.k_proj.out_features % d == 0
            and attn.q_proj.out_features == attn.k_proj.out_features * rep
            and attn.v_proj.out_features == attn.k_proj.out_features
            and attn.o_proj.in_features == attn.q_proj.out_features)


def _gpt2_block(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or getattr(layer, "crossattention", None) is not None:
        return False
    if not _children(attn, ("c_attn", "c_proj"), is_conv1d) or not _children(mlp, ("c_fc", "c_proj"), is_conv1d):
        return False
    d, heads, split = positive_int(attn, "head_dim"), positive_int(attn, "num_heads"), positive_int(attn, "split_size")
    return (d is not None and heads is not None and split == heads * d
            and attn.c_attn.nf == 3 * split and attn.c_proj.weight.shape[0] == split)


def decoder_blocks(model: nn.Module) -> list[Block]:
    """Every recognised decoder layer of `model` (see the module docstring), in execution order."""
    blocks = []
    for name, layer in model.named_modules():
        prefix = f"{name}." if name else ""
        if _llama_block(layer):
            blocks.append(Block(name, "llama", prefix + "self_attn", prefix + "mlp"))
        elif _gpt2_block(layer):
            blocks.append(Block(name, "gpt2", prefix + "attn", prefix + "mlp"))
    return blocks


def is_transformers_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers PreTrainedModel (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers model with a language-model head that can generate (a *ForCausalLM)."""
    can_generate = getattr(model, "can_generate", None)
    return is_transformers_model(model) and callable(can_generate) and bool(can_generate())


def _positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0)


def _causal_mask(backbone: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
    """The mask the backbone's own forward builds for an unpadded batch without a cache."""
    from transformers.masking_utils import create_causal_mask
    return create_causal_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=None,
                              cache=None, position_ids=positions)


def _llama_layer(index: int):
    def run(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        backbone = model.model
        positions = _positions(hidden)
        return backbone.layers[index](hidden, attention_mask=_causal_mask(backbone, hidden, positions),
                                      position_embeddings=backbone.rotary_emb(hidden, position_ids=positions),
                                      position_ids=positions)
    return run


def _gpt2_layer(index: int):
    def run(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        backbone = model.transformer
        positions = _positions(hidden)
        return backbone.h[index](hidden, attention_mask=_causal_mask(backbone, hidden, positions),
                                 position_ids=positions)
    return run


def decoder_segments(model: nn.Module):
    """The chain [(module names, fn(model, x))] whose composition is a Llama-style or GPT-2
    causal LM's logits for token ids x (B, L): the embeddings, each decoder layer, then the final
    norm and the LM head; None for any other model. Layers that mix attention kinds (sliding
    windows) are not told apart: the evaluator checks the chain against the whole forward pass
    and falls back to it when they differ."""
    if not is_causal_lm(model):
        return None
    blocks = decoder_blocks(model)
    families = {b.family for b in blocks}
    if families == {"llama"} and hasattr(model, "model") and hasattr(model.model, "rotary_emb"):
        n = len(model.model.layers)
        if [b.name for b in blocks] != [f"model.layers.{i}" for i in range(n)]:
            return None
        return ([(("model.embed_tokens",), lambda m, x: m.model.embed_tokens(x))]
                + [((f"model.layers.{i}",), _llama_layer(i)) for i in range(n)]
                + [(("model.norm", "lm_head"), lambda m, h: m.lm_head(m.model.norm(h)))])
    if families == {"gpt2"} and hasattr(model, "transformer"):
        n = len(model.transformer.h)
        if [b.name for b in blocks] != [f"transformer.h.{i}" for i in range(n)]:
            return None
        embed = lambda m, x: m.transformer.drop(m.transformer.wte(x) + m.transformer.wpe(_positions(x)))  # noqa: E731
        return ([(("transformer.wte", "transformer.wpe"), embed)]
                + [((f"transformer.h.{i}",), _gpt2_layer(i)) for i in range(n)]
                + [(("transformer.ln_f", "lm_head"), lambda m, h: m.lm_head(m.transformer.ln_f(h)))])
    return None
