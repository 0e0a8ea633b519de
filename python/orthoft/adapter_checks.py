"""What ``load_adapter`` checks before it changes a model: every problem of an adapter's files is an error
that names the file and the field or tensor, never a silent load or another library's bare exception.

- ``adapter_config.json``: UTF-8 JSON holding one object, and a valid config (its fields are checked by
  the config classes; their errors are prefixed with the file).
- ``adapter_model.safetensors``: a readable safetensors file (a damaged one is a ``ValueError`` naming
  it, not safetensors' own ``SafetensorError``).
- Each tensor read into the model: a floating dtype among float16, bfloat16, float32 and float64 for a
  floating parameter (PEFT saves adapters in their own dtype, so casting among those is legitimate;
  integers, booleans or float8 values are not adapter values), the target's own dtype otherwise, and
  finite values unless ``allow_non_finite`` (to inspect a diverged adapter).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import OrthoftConfig

__all__ = [
    "LOADABLE_FLOAT_DTYPES",
    "check_loaded_tensors",
    "config_from_file",
    "naming_file",
    "read_config",
    "read_tensors",
]

LOADABLE_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a ``ValueError`` naming the file if it is not UTF-8 JSON of one object."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from None
    except RecursionError:
        raise ValueError(f"{path} nests JSON arrays or objects too deeply to be an adapter config.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of config fields, got a {type(data).__name__}.")
    return data


def naming_file(error: Exception, path: Path) -> Exception:
    """A ``ValueError`` or ``TypeError`` with ``path`` before its message; other errors as they are."""
    return type(error)(f"{path}: {error}") if type(error) in (ValueError, TypeError) else error


def config_from_file(data: Mapping[str, Any], path: Path) -> OrthoftConfig:
    """``OrthoftConfig.from_dict(data)``, its errors (which name the field) prefixed with ``path``."""
    if isinstance(data, Mapping) and data.get("peft_type") == "LORA":
        # Said apart from other unknown types: a LoRA adapter (e.g. orthoft's own export) is a likely mix-up.
        raise ValueError(
            f"{path}: `peft_type` is 'LORA': this is a LoRA adapter (as save_as_lora writes), and orthoft "
            "loads OFT and BOFT adapters (`peft_type` 'OFT' or 'BOFT'); load a LoRA adapter with "
            "peft.PeftModel.from_pretrained"
        )
    try:
        return OrthoftConfig.from_dict(data)
    except (ValueError, TypeError) as error:
        raise naming_file(error, path) from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; a ``ValueError`` naming it if it is damaged."""
    try:
        return load_file(path)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as error:
        reason = f"{type(error).__name__}: {error}"
        raise ValueError(f"{path} is not a readable safetensors file: {reason}.") from None


def _dtype_problem(loaded: torch.dtype, target: torch.dtype) -> str | None:
    if target.is_floating_point:
        if loaded in LOADABLE_FLOAT_DTYPES:
            return None
        valid = ", ".join(str(dtype).removeprefix("torch.") for dtype in LOADABLE_FLOAT_DTYPES)
        return f"must be one of {valid} for a {str(target).removeprefix('torch.')} parameter"
    return None if loaded == target else f"must be {str(target).removeprefix('torch.')} as the model's tensor"


def check_loaded_tensors(
    tensors: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    source: Path,
    *,
    allow_non_finite: bool,
) -> None:
    """Each tensor of ``tensors`` has a dtype fit for its target and (unless allowed) finite values."""
    for key, target in targets.items():
        tensor = tensors[key]
        problem = _dtype_problem(tensor.dtype, target.dtype)
        if problem is not None:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise TypeError(f"{source}: tensor {key!r} is {dtype}; it {problem}.")
        if allow_non_finite or not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if not finite.all():
            bad = int((~finite).sum())
            raise ValueError(
                f"{source}: tensor {key!r} holds {bad} non-finite values (NaN or Inf) of {tensor.numel()}; "
                "the adapter diverged or the file is damaged. The model is unchanged; pass "
                "allow_non_finite=True to load it anyway for inspection."
            )
