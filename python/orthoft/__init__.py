"""orthoft: orthogonal finetuning (OFT and BOFT) for PyTorch with compiled C++ and CUDA kernels."""

from __future__ import annotations

import torch

from . import _C, ops, reference
from .adapter_io import load_adapter, save_adapter
from .config import BOFTConfig, OFTConfig
from .layers import BOFTConv2d, BOFTLinear, OFTConv2d, OFTLinear
from .tuner import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    get_nb_trainable_parameters,
    get_orthoft_model,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unload,
)

__version__ = "0.1.0"

__all__ = [
    "BOFTConfig",
    "BOFTConv2d",
    "BOFTLinear",
    "OFTConfig",
    "OFTConv2d",
    "OFTLinear",
    "__version__",
    "active_adapters",
    "cuda_kernels_available",
    "delete_adapter",
    "disable_adapters",
    "get_nb_trainable_parameters",
    "get_orthoft_model",
    "load_adapter",
    "merge_and_unload",
    "ops",
    "print_trainable_parameters",
    "reference",
    "save_adapter",
    "set_adapter",
    "unload",
]


def cuda_kernels_available() -> bool:
    """Whether this build holds orthoft's CUDA kernels and a CUDA device can run them."""
    return bool(_C.with_cuda) and torch.cuda.is_available()
