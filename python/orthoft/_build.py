"""What orthoft was built for, and the check that the running torch can load ``orthoft._C``.

CMake records the build in ``orthoft._build_config``; ``orthoft._C`` itself is an empty limited-API
module whose loading registers the operators. It is compiled against LibTorch's stable ABI of the
torch in ``torch_target`` (2.10), so it loads in that torch and every newer one. A build with CUDA
kernels also needs a CUDA build of torch with the same CUDA major version (the CUDA runtime it links).
"""

from __future__ import annotations

import importlib
import platform
import re
from types import ModuleType
from typing import Any

import torch

_BUILD_FROM_SOURCE = (
    "  pip install scikit-build-core ninja cmake\n"
    "  pip install --no-build-isolation --no-binary orthoft --force-reinstall --no-deps orthoft"
)


def _release(version: str) -> tuple[int, int]:
    """``(2, 13)`` for torch ``2.13.0+cu130`` or ``2.14.0.dev20260101``."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _wheel_tag(cuda_version: str | None) -> str:
    """``cu128`` for CUDA 12.8, ``cpu`` without CUDA: the variant in torch index URLs."""
    return "cpu" if cuda_version is None else "cu" + "".join(cuda_version.split(".")[:2])


def _build_config() -> ModuleType:
    try:
        return importlib.import_module("._build_config", __package__)
    except ImportError as error:
        raise ImportError(
            "orthoft's build record orthoft/_build_config.py, which its CMake build installs next to "
            "orthoft._C, is missing: this installation of orthoft is incomplete. Reinstall orthoft."
        ) from error


def _arch_list(cuda_archs: str) -> list[str]:
    """The entries of a ``TORCH_CUDA_ARCH_LIST`` string, which separates them by ``;`` or spaces."""
    return [arch for arch in re.split(r"[;\s]+", cuda_archs) if arch]


def _incompatibilities(config: ModuleType) -> list[str]:
    problems: list[str] = []
    if _release(torch.__version__) < _release(config.torch_target):
        problems.append(f"it needs torch {config.torch_target} or newer")
    if config.with_cuda:
        cuda_major = config.cuda_version.split(".")[0]
        if torch.version.cuda is None or torch.version.cuda.split(".")[0] != cuda_major:
            problems.append(
                f"its CUDA {config.cuda_version} kernels need a CUDA {cuda_major}.x build of torch"
            )
    return problems


def check_torch_compatibility() -> None:
    """Raise an ``ImportError`` saying what to install when the running torch cannot load ``orthoft._C``.

    ``_C`` needs torch ``torch_target`` (2.10) or newer and, when it holds CUDA kernels, a CUDA build of
    torch with the same CUDA major version. A build without CUDA kernels runs with either variant.
    """
    config = _build_config()
    problems = _incompatibilities(config)
    if not problems:
        return
    torch_install = f'pip install "torch>={config.torch_target}"'
    if config.with_cuda:
        torch_install += f" --index-url https://download.pytorch.org/whl/{_wheel_tag(config.cuda_version)}"
    found_cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    raise ImportError(
        f"orthoft {config.version} cannot run with the torch found here: {'; '.join(problems)}.\n"
        f"Found: torch {torch.__version__} ({found_cuda}) in {torch.__path__[0]}\n"
        f"Install a torch this orthoft runs with:\n  {torch_install}\n"
        f"or the orthoft wheel of the torch variant found here ({_wheel_tag(torch.version.cuda)}), or "
        f"build orthoft from source against it:\n{_BUILD_FROM_SOURCE}"
    )


def archs_support_device(cuda_archs: str, capability: tuple[int, int]) -> bool:
    """Whether kernels compiled for ``cuda_archs`` (``TORCH_CUDA_ARCH_LIST`` syntax) run on a device.

    Code for ``X.Y`` runs on ``X.Z`` for ``Z >= Y``; ``+PTX`` also lets any newer device compile it
    just in time. Named entries (``Ampere``) are not understood and count as no support.
    """
    for arch in _arch_list(cuda_archs):
        match = re.match(r"(\d+)\.(\d+)", arch)
        if match is None:
            continue
        built = (int(match[1]), int(match[2]))
        same_major = capability[0] == built[0] and capability[1] >= built[1]
        if same_major or (arch.endswith("+PTX") and capability >= built):
            return True
    return False


def _gpu(config: ModuleType) -> tuple[str | None, bool]:
    """The current CUDA device (name and compute capability) and whether orthoft's kernels run on it."""
    if not torch.cuda.is_available():
        return None, False
    capability = torch.cuda.get_device_capability()
    name = f"{torch.cuda.get_device_name()} (compute capability {capability[0]}.{capability[1]})"
    return name, bool(config.with_cuda) and archs_support_device(config.cuda_archs, capability)


def build_info() -> dict[str, Any]:
    """How orthoft was built and what it runs with, for bug reports (``python -m orthoft`` prints it)."""
    config = _build_config()
    gpu, kernels_usable = _gpu(config)
    return {
        "orthoft": config.version,
        "torch_target": config.torch_target,
        "torch_built": config.torch_version,
        "torch_running": str(torch.__version__),
        "cuda_built": config.cuda_version,
        "cuda_running": torch.version.cuda,
        "cuda_archs": _arch_list(config.cuda_archs),
        "cuda_kernels_present": bool(config.with_cuda),
        "cuda_kernels_usable": kernels_usable,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
