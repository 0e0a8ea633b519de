"""orthoft: orthogonal finetuning (OFT and BOFT) for PyTorch with compiled C++ and CUDA kernels."""

from __future__ import annotations

import torch

from ._build import build_info, check_torch_compatibility

# Before _C: a torch older than the stable ABI _C targets fails to load it with an undefined symbol.
check_torch_compatibility()

from . import _build_config, ops, reference  # noqa: E402
from .adapter_io import load_adapter, save_adapter  # noqa: E402
from .cayley_form import convert_cayley_form  # noqa: E402
from .config import BOFTConfig, OFTConfig  # noqa: E402
from .layers import (  # noqa: E402
    BOFTConv2d,
    BOFTEmbedding,
    BOFTLinear,
    BOFTParameter,
    LycorisConv2d,
    LycorisLinear,
    OFTConv2d,
    OFTEmbedding,
    OFTLinear,
    OFTParameter,
)
from .lora_export import convert_to_lora, save_as_lora  # noqa: E402
from .lycoris_config import LycorisConfig  # noqa: E402
from .orthogonality import (  # noqa: E402
    OrthogonalityError,
    OrthogonalityWarning,
    orthogonality_check,
    orthogonality_report,
    set_orthogonality_check,
)
from .tuner import (  # noqa: E402
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
    "BOFTEmbedding",
    "BOFTLinear",
    "BOFTParameter",
    "LycorisConfig",
    "LycorisConv2d",
    "LycorisLinear",
    "OFTConfig",
    "OFTConv2d",
    "OFTEmbedding",
    "OFTLinear",
    "OFTParameter",
    "OrthogonalityCallback",
    "OrthogonalityError",
    "OrthogonalityWarning",
    "__version__",
    "active_adapters",
    "build_info",
    "convert_cayley_form",
    "convert_to_lora",
    "cuda_kernels_available",
    "delete_adapter",
    "disable_adapters",
    "get_nb_trainable_parameters",
    "get_orthoft_model",
    "load_adapter",
    "merge_and_unload",
    "ops",
    "orthogonality_check",
    "orthogonality_report",
    "print_trainable_parameters",
    "reference",
    "save_adapter",
    "save_as_lora",
    "set_adapter",
    "set_orthogonality_check",
    "unload",
]


def cuda_kernels_available() -> bool:
    """Whether this build holds orthoft's CUDA kernels and a CUDA device can run them."""
    return _build_config.with_cuda and torch.cuda.is_available()


def __getattr__(name: str) -> object:
    # The Trainer callback imports transformers: only when it is asked for.
    if name == "OrthogonalityCallback":
        from .trainer_callback import OrthogonalityCallback

        return OrthogonalityCallback
    raise AttributeError(f"module 'orthoft' has no attribute {name!r}")
