"""Small transformers and diffusers models built from configs, shared by the tests (no download)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
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


def tiny_unet(seed: int = 0) -> nn.Module:
    """diffusers' ``UNet2DConditionModel`` with two blocks of 8 and 16 channels, a cross-attention block in
    each direction, weights drawn from ``seed``, in eval mode; skips the test without diffusers."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()
