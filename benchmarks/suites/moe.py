"""Training step of a Qwen3-MoE decoder with adapters on every expert weight (``target_parameters``).

orthoft's OFT and BOFT rotate each expert's weight once per step, for all experts at once, and run the
experts module on the rotated weights (the parameter route, which fits any experts implementation).
Beside it: OFT on the routed activations instead (each expert's tokens rotated before its frozen
weights, written here for Qwen3-MoE's own loop over experts: the route that needs the experts' forward),
PEFT's LoRA on the same parameters, and the frozen model's forward and backward. One step is forward,
backward, an AdamW step and gradients set to None. Each shape runs with transformers' eager loop over
experts (the forward the activation route is written into) and with its grouped matmuls (its default).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

import orthoft
from cases import Case, Settings, Step, Suite
from orthoft.layers.parameter import ParameterLayer
from peft_support import PEFT_MISSING, peft_model, peft_version
from steps import perturb_trainable, randn, trainable

EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
OFT_BLOCK_SIZE = 32
BOFT_BLOCK_SIZE = 8
BOFT_FACTORS = 2
LORA_RANK = 16
LEARNING_RATE = 1e-5

FROZEN = "frozen model (forward + backward)"
ORTHOFT_OFT = f"orthoft OFT b={OFT_BLOCK_SIZE} (rotated weights)"
ORTHOFT_BOFT = f"orthoft BOFT b={BOFT_BLOCK_SIZE} m={BOFT_FACTORS} (rotated weights)"
ROUTED_OFT = f"OFT b={OFT_BLOCK_SIZE} on the routed activations"
PEFT_LORA = f"PEFT LoRA r={LORA_RANK}"


@dataclass(frozen=True)
class MoE:
    hidden: int
    expert_width: int  # moe_intermediate_size
    experts: int
    top_k: int
    layers: int
    tokens: int
    implementation: str = "eager"  # transformers' experts_implementation


# CPU: small enough for a 2-core machine to step in about a second; CUDA: Qwen3-30B-A3B's expert sizes.
SHAPES: dict[str, dict[str, MoE]] = {
    "smoke": {"cpu": MoE(64, 32, 4, 2, 1, 32), "cuda": MoE(64, 32, 4, 2, 1, 32)},
    "quick": {"cpu": MoE(512, 256, 16, 4, 1, 512), "cuda": MoE(2048, 768, 128, 8, 1, 4096)},
    "full": {"cpu": MoE(768, 256, 16, 4, 2, 512), "cuda": MoE(2048, 768, 128, 8, 2, 8192)},
}


def shape_label(s: MoE) -> str:
    layers = f"{s.layers} layer" + ("s" if s.layers > 1 else "")
    return (
        f"hidden {s.hidden}, {s.experts} experts of width {s.expert_width}, top-{s.top_k}, {layers}, "
        f"{s.tokens} tokens, {s.implementation} experts"
    )


def cases(settings: Settings) -> list[Case]:
    """Each shape with transformers' eager loop over experts and with its grouped matmuls (its default);
    the activation route exists for the loop only."""
    dtype = settings.dtype or ("bfloat16" if settings.on_cuda else "float32")
    peft_skip = None if peft_version() else PEFT_MISSING
    out = []
    for implementation in ("eager", "grouped_mm"):
        shape = replace(SHAPES[settings.size][settings.device.type], implementation=implementation)
        competitors = [
            (FROZEN, "frozen", None),
            (ORTHOFT_OFT, "orthoft_oft", None),
            (ORTHOFT_BOFT, "orthoft_boft", None),
            *([(ROUTED_OFT, "routed_oft", None)] if implementation == "eager" else []),
            (PEFT_LORA, "peft_lora", peft_skip),
        ]
        out += [
            Case("moe", shape_label(shape), label, FROZEN, dtype, {"kind": kind, **shape.__dict__}, skip)
            for label, kind, skip in competitors
        ]
    return out


def _decoder(s: MoE, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeModel

    config = Qwen3MoeConfig(
        hidden_size=s.hidden,
        intermediate_size=4 * s.expert_width,  # unused: every layer is sparse
        moe_intermediate_size=s.expert_width,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        num_hidden_layers=s.layers,
        num_attention_heads=max(1, s.hidden // 128),
        num_key_value_heads=max(1, s.hidden // 512),
        head_dim=128 if s.hidden >= 128 else s.hidden,
        vocab_size=256,  # unused: the model takes embeddings
        max_position_embeddings=s.tokens,
        use_cache=False,
        attn_implementation="sdpa",
        experts_implementation=s.implementation,
    )
    with torch.device(device):
        model = Qwen3MoeModel(config)
    with torch.no_grad():  # transformers leaves expert weights as allocated; give them values
        for name, parameter in model.named_parameters():
            if "experts" in name:
                parameter.normal_(0, 0.02)
    return model.to(dtype).requires_grad_(False).train()


class RoutedRotation(nn.Module):
    """Qwen3-MoE's loop over experts with each expert's tokens rotated (``x @ R_e``) before its frozen
    gate_up and down weights, the rotations those of orthoft's OFT adapters on the two parameters."""

    def __init__(self, adapted: ParameterLayer) -> None:
        super().__init__()
        self.down, self.gate_up = adapted, adapted.base_layer
        self.experts = self.gate_up.base_layer

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        experts = self.experts
        gate_up, gate_up_block = self.gate_up._rotation_factors("default", self.training)
        down, down_block = self.down._rotation_factors("default", self.training)
        per_gate_up, per_down = gate_up.shape[1] // experts.num_experts, down.shape[1] // experts.num_experts
        out = torch.zeros_like(hidden)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=experts.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for (e,) in hit.tolist():
            position, token = torch.where(mask[e])
            x = orthoft.ops.butterfly(
                hidden[token],
                gate_up[:, e * per_gate_up : (e + 1) * per_gate_up].to(hidden.dtype),
                gate_up_block,
            )
            gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            inner = orthoft.ops.butterfly(
                experts.act_fn(gate) * up,
                down[:, e * per_down : (e + 1) * per_down].to(hidden.dtype),
                down_block,
            )
            y = nn.functional.linear(inner, experts.down_proj[e]) * top_k_weights[token, position, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _adapted(model: nn.Module, kind: str) -> nn.Module:
    if kind == "frozen":
        return model
    if kind in ("orthoft_oft", "routed_oft"):
        config = orthoft.OFTConfig(
            target_modules=[], target_parameters=EXPERT_PARAMETERS, oft_block_size=OFT_BLOCK_SIZE
        )
        model = orthoft.get_orthoft_model(model, config)
        if kind == "routed_oft":
            for layer in model.layers:
                layer.mlp.experts = RoutedRotation(layer.mlp.experts)
        return model
    if kind == "orthoft_boft":
        config = orthoft.BOFTConfig(
            target_modules=[],
            target_parameters=EXPERT_PARAMETERS,
            boft_block_size=BOFT_BLOCK_SIZE,
            boft_n_butterfly_factor=BOFT_FACTORS,
        )
        return orthoft.get_orthoft_model(model, config)
    if kind == "peft_lora":
        return peft_model(
            model,
            "lora",
            target_modules=[],
            target_parameters=EXPERT_PARAMETERS,
            r=LORA_RANK,
            lora_alpha=LORA_RANK,
        )
    raise ValueError(f"unknown competitor kind {kind!r}")


def build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype, rotate: bool) -> Step:
    shape = MoE(*(spec[name] for name in MoE.__dataclass_fields__))
    model = _adapted(_decoder(shape, device, dtype), spec["kind"])
    perturb_trainable(model)
    parameters = trainable(model)
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE) if parameters else None
    x = randn((1, shape.tokens, shape.hidden), device, dtype, requires_grad=True)
    grad = randn((1, shape.tokens, shape.hidden), device, dtype)

    def step(i: int) -> None:
        model(inputs_embeds=x).last_hidden_state.backward(grad)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None

    return step


SUITE = Suite(
    name="moe",
    title="moe: training step of a Qwen3-MoE decoder, adapters on all expert weights",
    ratio_header="÷ frozen model",
    cases=cases,
    build=build,
)
