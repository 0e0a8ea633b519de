"""Small transformers models built from configs, shared by the tests (no download)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A two-layer Llama with hidden size 32 and a 48-token vocabulary; ``overrides`` change fields."""
    fields: dict[str, Any] = {
        "vocab_size": 48,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    return LlamaConfig(**{**fields, **overrides})


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """``tiny_llama_config(**overrides)`` with weights drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
