"""Module names in kohya's files: ``lora_unet_<path>``, ``lora_te_<path>`` (SDXL: ``lora_te1_``/``2_``).

SD1.5 files name UNet modules by their diffusers paths; SDXL files by the original (LDM/SGM) UNet's
paths, ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` for diffusers'
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. ``ldm_unet_path`` maps one to the other
from the UNet's config, following the layout that diffusers' single-file converter reads
(``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``; the tests check them against it).
Text encoders keep their transformers paths as the checkpoints have them: ``text_model.encoder.layers.0...``
for CLIP, also where transformers' ``CLIPTextModel`` holds its parts directly (``encoder.layers.0...``).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["is_unet", "ldm_unet_path", "text_encoder_path", "uses_ldm_names"]

# diffusers' resnet parts -> the LDM ResBlock's.
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Top-level modules, diffusers -> LDM.
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def is_unet(model: Any) -> bool:
    """Whether ``model`` is a diffusers ``UNet2DConditionModel`` (named ``lora_unet_`` in kohya's files)."""
    config = getattr(model, "config", None)
    return type(model).__name__ == "UNet2DConditionModel" or (
        config is not None and hasattr(config, "down_block_types") and hasattr(config, "layers_per_block")
    )


def uses_ldm_names(unet: Any) -> bool:
    """SDXL's UNet (its added ``text_time`` embedding) is named by LDM paths in kohya's files."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _resnet(rest: str) -> str | None:
    head, _, tail = rest.partition(".")
    part = _RESNET_PARTS.get(head)
    return None if part is None else part + (f".{tail}" if tail else "")


def ldm_unet_path(path: str, config: Any) -> str | None:
    """The LDM path of the diffusers UNet module ``path``, or ``None`` where the LDM UNet has none."""
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        return None  # per-block counts: not an SD/SDXL layout
    stride = per_block + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        inner = _resnet(rest) if kind == "resnets" else rest
        slot = 0 if kind == "resnets" else 1
        return None if inner is None else f"input_blocks.{block * stride + index + 1}.{slot}.{inner}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{(int(match[1]) + 1) * stride}.0.op"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", path):
        inner = _resnet(match[2])
        return None if inner is None else f"middle_block.{2 * int(match[1])}.{inner}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        inner = _resnet(rest) if kind == "resnets" else rest
        slot = 0 if kind == "resnets" else 1
        return None if inner is None else f"output_blocks.{block * stride + index}.{slot}.{inner}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        block = int(match[1])
        with_attention = "CrossAttn" in config.up_block_types[block]
        return f"output_blocks.{block * stride + per_block}.{2 if with_attention else 1}.conv"
    return None


def text_encoder_path(model: Any, path: str) -> str:
    """The path of a text encoder's module as kohya's files name it: CLIP's under ``text_model.``."""
    flattened_clip = type(model).__name__.startswith("CLIPTextModel") and not hasattr(model, "text_model")
    return f"text_model.{path}" if flattened_clip else path
