"""Orthogonal finetuning layers: OFT and BOFT adapters on Linear (and Conv1D) and Conv2d layers."""

from __future__ import annotations

from .base import OrthoftLayer
from .boft import BOFTConv2d, BOFTLinear
from .oft import OFTConv2d, OFTLinear

__all__ = ["BOFTConv2d", "BOFTLinear", "OFTConv2d", "OFTLinear", "OrthoftLayer"]
