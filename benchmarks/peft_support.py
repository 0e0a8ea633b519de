"""PEFT as a competitor: whether it is installed, its BOFT CUDA extension, and wrapping one layer.

PEFT's BOFT JIT-compiles a CUDA extension (``fbd_cuda``, its ``FastBlockDiag``) the first time a BOFT
layer is built; without it, PEFT silently runs ``n_butterfly_factor = 1``. The benchmarks use the
extension only when an earlier build left it importable, and never start a compile (minutes, nvcc).
"""

from __future__ import annotations

import functools
import glob
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

PEFT_MISSING = "peft is not installed"


@functools.cache
def peft_version() -> str | None:
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def peft_oft_conv_is_exact(version: str | None = None) -> bool:
    """Whether PEFT's OFT Conv2d (of ``version``, default the installed one) rotates the weight and calls
    the base conv, exact as orthoft's is: from PEFT 0.22 on. Before, it unfolded and folded the input."""
    from packaging.version import Version

    version = version or peft_version()
    return version is not None and Version(version) >= Version("0.22")


@functools.cache
def fast_block_diag() -> tuple[ModuleType | None, str]:
    """PEFT's prebuilt ``fbd_cuda`` module, or ``None`` and why it is not used."""
    if peft_version() is None:
        return None, PEFT_MISSING
    if not torch.cuda.is_available():
        return None, "PEFT's FastBlockDiag (fbd_cuda) runs on CUDA only"
    from torch.utils import cpp_extension

    # The folder torch.utils.cpp_extension.load builds "fbd_cuda" in, for this Python and CUDA.
    build_dir = cpp_extension._get_build_directory("fbd_cuda", verbose=False)
    libraries = sorted(glob.glob(os.path.join(build_dir, "fbd_cuda*.so")))
    if not libraries:
        return None, "PEFT's fbd_cuda extension is not built (it needs a JIT CUDA compile, not started here)"
    spec = importlib.util.spec_from_file_location("fbd_cuda", libraries[0])
    if spec is None or spec.loader is None:
        return None, f"PEFT's fbd_cuda extension at {libraries[0]} cannot be loaded"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ""


def peft_boft_skip(n_butterfly_factor: int) -> str | None:
    """Why PEFT's BOFT cannot run this many butterfly factors here, or ``None`` if it can."""
    if peft_version() is None:
        return PEFT_MISSING
    module, reason = fast_block_diag()
    if n_butterfly_factor > 1 and module is None:
        return f"PEFT's BOFT runs m > 1 only with fbd_cuda: {reason}"
    return None


def _use_prebuilt_fast_block_diag_only() -> None:
    from peft.tuners.boft import layer as boft_layer

    module, _ = fast_block_diag()
    boft_layer.get_fbd_cuda = lambda: module


def peft_block_diag() -> Callable[[torch.Tensor], torch.Tensor]:
    """PEFT's ``FastBlockDiag.apply``, ``(N, D, b, b) -> (N, D*b, D*b)``; needs ``fast_block_diag()``."""
    _use_prebuilt_fast_block_diag_only()
    from peft.tuners.boft.layer import FastBlockDiag

    return FastBlockDiag.apply


class _OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def peft_model(model: nn.Module, method: str, **config: Any) -> nn.Module:
    """PEFT's adapters on ``model``, in place, by ``get_peft_model`` as a user would.

    ``method`` is ``"boft"``, ``"oft"`` or ``"lora"``; ``config`` holds that config's fields.
    """
    import peft

    _use_prebuilt_fast_block_diag_only()
    config_class = {"boft": peft.BOFTConfig, "oft": peft.OFTConfig, "lora": peft.LoraConfig}[method]
    device = next(model.parameters()).device
    with warnings.catch_warnings():  # transformers' deprecation notice about a name PEFT still calls
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        wrapped = peft.get_peft_model(model, config_class(**config))
    if method == "boft" and config.get("boft_n_butterfly_factor", 1) > 1:
        for module in wrapped.modules():
            if getattr(module, "fbd_cuda_available", True) is False:
                raise RuntimeError(
                    "PEFT's BOFT fell back to one butterfly factor; check peft_boft_skip first"
                )
    return wrapped.to(device)  # PEFT leaves BOFT's permutation buffer on the CPU


def peft_wrapped(layer: nn.Module, method: str, **config: Any) -> nn.Module:
    """PEFT's adapter layer around ``layer`` (see ``peft_model``)."""
    model = peft_model(_OneLayer(layer), method, target_modules=["layer"], **config)
    return model.base_model.model.layer
