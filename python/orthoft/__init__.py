"""orthoft: orthogonal finetuning (OFT and BOFT) for PyTorch with compiled C++ and CUDA kernels."""

from __future__ import annotations

import torch

from . import _C, ops, reference
from .layers import BOFTConv2d, BOFTLinear, OFTConv2d, OFTLinear

__version__ = "0.1.0"

__all__ = [
    "BOFTConv2d",
    "BOFTLinear",
    "OFTConv2d",
    "OFTLinear",
    "__version__",
    "cuda_kernels_available",
    "ops",
    "reference",
]


def cuda_kernels_available() -> bool:
    """Whether this build holds orthoft's CUDA kernels and a CUDA device can run them."""
    return bool(_C.with_cuda) and torch.cuda.is_available()
