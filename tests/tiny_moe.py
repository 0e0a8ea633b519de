"""Small mixture-of-experts models built from configs (no download), and a hand-made module with 3-D and
2-D parameters, shared by the tests of ``target_parameters``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 48
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Hidden 32 and expert width 24 differ, so that a weight read in the wrong orientation cannot fit.
_SHARED: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_qwen3_moe_config(**overrides: Any) -> Qwen3MoeConfig:
    """Qwen3-MoE: experts ``gate_up_proj`` (4, 48, 32), ``down_proj`` (4, 32, 24): ``(experts, out, in)``."""
    fields = {
        **_SHARED,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 8,
    }
    return Qwen3MoeConfig(**{**fields, **overrides})


def tiny_qwen3_moe(seed: int = 0, **overrides: Any) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(tiny_qwen3_moe_config(**overrides)).eval()


def tiny_gpt_oss(seed: int = 0, **overrides: Any) -> GptOssForCausalLM:
    """gpt-oss: experts stored ``(experts, in, out)`` (``is_transposed``): ``gate_up_proj`` (4, 32, 48)."""
    fields = {
        **_SHARED,
        "intermediate_size": 24,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 8,
        "layer_types": ["full_attention", "full_attention"],
    }
    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():  # its expert biases start at zero; random ones test that they stay untouched
        for name, parameter in model.named_parameters():
            if name.endswith("_bias"):
                parameter.normal_(0, 0.1)
    return model


def tiny_mixtral(seed: int = 0, **overrides: Any) -> MixtralForCausalLM:
    """Mixtral: experts ``gate_up_proj`` (4, 48, 32) and ``down_proj`` (4, 32, 24), ``(experts, out, in)``."""
    fields = {**_SHARED, "intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2}
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**{**fields, **overrides})).eval()


class HandMadeExperts(nn.Module):
    """Every token through every expert (dense mixture), then a 2-D projection: ``up`` is 3-D,
    ``(experts, inner, hidden)`` or ``(experts, hidden, inner)`` with ``is_transposed``; ``proj`` is
    ``(out, inner)``. ``scale`` (1-D) and ``steps`` (integer) are parameters that cannot be adapted."""

    def __init__(self, experts: int = 3, hidden: int = 16, inner: int = 8, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        shape = (experts, hidden, inner) if transposed else (experts, inner, hidden)
        self.up = nn.Parameter(torch.randn(shape))
        self.proj = nn.Parameter(torch.randn(12, inner))
        self.scale = nn.Parameter(torch.ones(12))
        self.steps = nn.Parameter(torch.arange(3), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up if self.is_transposed else self.up.mT  # (experts, hidden, inner)
        inner = torch.tanh(torch.einsum("th,ehi->eti", x, up)).mean(0)
        return (inner @ self.proj.T) * self.scale


class HandMade(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.block = HandMadeExperts(transposed=transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def hand_made(seed: int = 0, transposed: bool = False) -> HandMade:
    torch.manual_seed(seed)
    return HandMade(transposed).eval()
