"""The shipped language model: a Llama-style decoder (RMSNorm, rotary positions, SwiGLU MLP) with
grouped-query attention, built from a transformers `LlamaConfig` (nothing is downloaded).

The `LlamaForCausalLM` is returned as is, not wrapped: `model(ids)` with ids (B, L) returns a
`CausalLMOutputWithPast` whose `.logits` are (B, L, vocab_size). Input and output embeddings are
tied, so the vocabulary costs its table once.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .hf import _transformers
from ..errors import IntraFusionError


def llama_gqa(vocab_size: int, context: int = 256, hidden_size: int = 192, num_hidden_layers: int = 4,
              num_attention_heads: int = 6, num_key_value_heads: int = 2,
              intermediate_size: int = 512, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> nn.Module:
    """A freshly initialised `LlamaForCausalLM` over `vocab_size` tokens and up to `context`
    positions (head_dim = hidden_size / num_attention_heads; init from torch's global RNG).
    The defaults are the shipped size: 6 query heads sharing 2 key/value heads (GQA 3:1),
    head_dim 32, SwiGLU width 512 = 8/3 × 192."""
    transformers = _transformers()
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=context, tie_word_embeddings=True, attention_dropout=0.0,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=None)
    return transformers.LlamaForCausalLM(config)


def load_llama(folder: Path) -> nn.Module:
    """The `LlamaForCausalLM` saved in `folder` by save_pretrained (config.json and
    model.safetensors; no code from the folder runs), in eval mode."""
    try:
        model = _transformers().LlamaForCausalLM.from_pretrained(folder, use_safetensors=True)
    except Exception as exc:  # a damaged file fails in many ways (SafetensorError, KeyError, ...)
        raise IntraFusionError(f"{folder} holds no loadable Llama checkpoint ({type(exc).__name__}); "
                               "retrain it with train_lm.py or unzip models.zip") from None
    return model.eval()
