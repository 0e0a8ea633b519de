"""Orthogonal finetuning layers: OFT and BOFT adapters on Linear (and Conv1D, quantized linears), Conv2d
and Embedding layers."""

from __future__ import annotations

from .base import OrthoftLayer
from .boft import BOFTConv2d, BOFTLinear
from .embedding import BOFTEmbedding, OFTEmbedding
from .oft import OFTConv2d, OFTLinear
from .output_side import LycorisConv2d, LycorisLinear
from .parameter import BOFTParameter, OFTParameter
from .quantized import register_quantized_kinds

register_quantized_kinds()

# The layer classes the tuner picks from, by method (options class) and base-layer family.
LAYER_CLASSES: tuple[type[OrthoftLayer], ...] = (
    OFTLinear,
    OFTConv2d,
    OFTEmbedding,
    BOFTLinear,
    BOFTConv2d,
    BOFTEmbedding,
    LycorisLinear,
    LycorisConv2d,
)

__all__ = [
    "LAYER_CLASSES",
    "BOFTConv2d",
    "BOFTEmbedding",
    "BOFTLinear",
    "BOFTParameter",
    "LycorisConv2d",
    "LycorisLinear",
    "OFTConv2d",
    "OFTEmbedding",
    "OFTLinear",
    "OFTParameter",
    "OrthoftLayer",
]
