"""Training step of a Llama-style decoder with adapters on every linear layer: orthoft against PEFT.

One step is what a finetuning loop does: forward, backward, an AdamW step, gradients set to None.
The frozen model's forward and backward (no optimizer) is the floor every adapter adds to. The
decoder is transformers' ``LlamaModel`` built from a ``LlamaConfig`` with random weights; it takes
``inputs_embeds`` that require grad, as the output of an earlier trainable part would.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import orthoft
from cases import Case, Settings, Step, Suite
from peft_support import PEFT_MISSING, peft_boft_skip, peft_model, peft_version
from steps import perturb_trainable, randn, trainable

LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OFT_BLOCK_SIZE = 32
BOFT_BLOCK_SIZE = 8
LORA_RANK = 16
LEARNING_RATE = 1e-5

FROZEN = "frozen model (forward + backward)"
ORTHOFT_OFT = f"orthoft OFT b={OFT_BLOCK_SIZE}"
# The same without the training-time orthogonality check of the series (on by default): its cost.
ORTHOFT_OFT_UNCHECKED = f"orthoft OFT b={OFT_BLOCK_SIZE}, orthogonality check off"
PEFT_OFT = f"PEFT OFT b={OFT_BLOCK_SIZE}"
PEFT_LORA = f"PEFT LoRA r={LORA_RANK}"


def orthoft_boft_label(factors: int) -> str:
    return f"orthoft BOFT b={BOFT_BLOCK_SIZE} m={factors}"


def peft_boft_label(factors: int) -> str:
    return f"PEFT BOFT b={BOFT_BLOCK_SIZE} m={factors}"


@dataclass(frozen=True)
class Decoder:
    hidden: int
    mlp: int
    layers: int
    heads: int
    tokens: int


# CPU: a small decoder a 2-core machine steps in about a second; CUDA: Llama-2-7B's layers, 8192 tokens.
DECODERS: dict[str, dict[str, Decoder]] = {
    "smoke": {"cpu": Decoder(64, 192, 1, 4, 32), "cuda": Decoder(64, 192, 1, 4, 32)},
    "quick": {"cpu": Decoder(1024, 2816, 1, 16, 256), "cuda": Decoder(4096, 11008, 2, 32, 4096)},
    "full": {"cpu": Decoder(1024, 2816, 2, 16, 512), "cuda": Decoder(4096, 11008, 4, 32, 8192)},
}


def shape_label(d: Decoder) -> str:
    layers = f"{d.layers} layer" + ("s" if d.layers > 1 else "")
    return f"hidden {d.hidden}, MLP {d.mlp}, {layers}, {d.tokens} tokens"


def default_dtype(settings: Settings) -> str:
    return settings.dtype or ("bfloat16" if settings.on_cuda else "float32")


def _competitors() -> list[tuple[str, dict[str, Any], str | None]]:
    """(label, spec, skip reason) of every competitor, the frozen baseline first."""
    peft_skip = None if peft_version() else PEFT_MISSING
    boft = [(m, {"kind": "orthoft_boft", "factors": m}) for m in (1, 4)]
    return [
        (FROZEN, {"kind": "frozen"}, None),
        (ORTHOFT_OFT, {"kind": "orthoft_oft"}, None),
        (ORTHOFT_OFT_UNCHECKED, {"kind": "orthoft_oft", "orthogonality_check": "off"}, None),
        *((orthoft_boft_label(m), spec, None) for m, spec in boft),
        (PEFT_OFT, {"kind": "peft_oft"}, peft_skip),
        *((peft_boft_label(m), {"kind": "peft_boft", "factors": m}, peft_boft_skip(m)) for m in (1, 4)),
        (PEFT_LORA, {"kind": "peft_lora"}, peft_skip),
    ]


def cases(settings: Settings) -> list[Case]:
    decoder = DECODERS[settings.size][settings.device.type]
    shape, dtype = shape_label(decoder), default_dtype(settings)
    return [
        Case("model", shape, label, FROZEN, dtype, {**spec, **decoder.__dict__}, skip)
        for label, spec, skip in _competitors()
    ]


def _decoder(d: Decoder, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=d.hidden,
        intermediate_size=d.mlp,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.heads,
        vocab_size=256,  # unused: the model takes embeddings
        max_position_embeddings=d.tokens,
        use_cache=False,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaModel(config)
    return model.to(dtype).requires_grad_(False).train()


def _adapted(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    kind = spec["kind"]
    if kind == "frozen":
        return model
    if kind == "orthoft_oft":
        config = orthoft.OFTConfig(target_modules=LINEAR_LAYERS, r=0, oft_block_size=OFT_BLOCK_SIZE)
        return orthoft.get_orthoft_model(model, config)
    if kind == "orthoft_boft":
        config = orthoft.BOFTConfig(
            target_modules=LINEAR_LAYERS,
            boft_block_size=BOFT_BLOCK_SIZE,
            boft_n_butterfly_factor=spec["factors"],
        )
        return orthoft.get_orthoft_model(model, config)
    if kind == "peft_oft":
        return peft_model(model, "oft", target_modules=LINEAR_LAYERS, r=0, oft_block_size=OFT_BLOCK_SIZE)
    if kind == "peft_boft":
        options = {"boft_block_size": BOFT_BLOCK_SIZE, "boft_n_butterfly_factor": spec["factors"]}
        return peft_model(model, "boft", target_modules=LINEAR_LAYERS, **options)
    if kind == "peft_lora":
        return peft_model(model, "lora", target_modules=LINEAR_LAYERS, r=LORA_RANK, lora_alpha=LORA_RANK)
    raise ValueError(f"unknown competitor kind {kind!r}")


def build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype, rotate: bool) -> Step:
    # One input set: every training step reads all weights, far more than any cache holds.
    decoder = Decoder(spec["hidden"], spec["mlp"], spec["layers"], spec["heads"], spec["tokens"])
    model = _adapted(_decoder(decoder, device, dtype), spec)
    perturb_trainable(model)
    parameters = trainable(model)
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE) if parameters else None
    x = randn((1, decoder.tokens, decoder.hidden), device, dtype, requires_grad=True)
    grad = randn((1, decoder.tokens, decoder.hidden), device, dtype)

    check = spec.get("orthogonality_check")

    def step(i: int) -> None:
        with orthoft.orthogonality_check(mode=check) if check else contextlib.nullcontext():
            model(inputs_embeds=x).last_hidden_state.backward(grad)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None

    return step


SUITE = Suite(
    name="model",
    title="model: training step of a Llama-style decoder, adapters on all linear layers",
    ratio_header="÷ frozen model",
    cases=cases,
    build=build,
)
