"""What a result file must say about where and how it was measured."""

from __future__ import annotations

import datetime
import platform
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import orthoft
from peft_support import fast_block_diag, peft_version


@dataclass(frozen=True)
class Environment:
    device: str  # "cpu" or "cuda"
    device_name: str
    threads: int
    torch: str
    orthoft: str
    orthoft_cuda_kernels: str
    peft: str
    peft_fast_block_diag: str
    date: str
    command: str

    def as_dict(self) -> dict[str, str | int]:
        return asdict(self)

    def header_lines(self) -> list[str]:
        return [
            f"device: {self.device_name} ({self.device}, {self.threads} CPU threads)",
            f"torch: {self.torch}",
            f"orthoft: {self.orthoft}, CUDA kernels: {self.orthoft_cuda_kernels}",
            f"peft: {self.peft}, FastBlockDiag: {self.peft_fast_block_diag}",
            f"date: {self.date}",
            f"command: {self.command}",
        ]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def _kernels_used(device: torch.device) -> str:
    if device.type != "cuda":
        return "not used (CPU run)"
    if orthoft.cuda_kernels_available():
        return "used"
    return "NOT used: this build has none, CUDA tensors take the pure PyTorch reference"


def describe(device: torch.device, now: datetime.datetime) -> Environment:
    version = peft_version()
    module, reason = fast_block_diag()
    return Environment(
        device=device.type,
        device_name=device_name(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        orthoft=orthoft.__version__,
        orthoft_cuda_kernels=_kernels_used(device),
        peft=version or "not installed (PEFT competitors skipped)",
        peft_fast_block_diag="used (prebuilt fbd_cuda)" if module is not None else f"not used: {reason}",
        date=now.isoformat(timespec="seconds"),
        command=shlex.join([Path(sys.executable).name, *sys.argv]),
    )


def file_stem(env: Environment, dtypes: list[str], now: datetime.datetime) -> str:
    """``<device>-<model>_<dtypes>_<date>_<time>``.

    For example ``cuda-NVIDIA-H100-80GB-HBM3_bfloat16+float32_2025-01-31_140502``.
    """
    model = re.sub(r"[^A-Za-z0-9.]+", "-", env.device_name).strip("-")
    return f"{env.device}-{model}_{'+'.join(sorted(dtypes))}_{now:%Y-%m-%d_%H%M%S}"
