"""Saving and loading one adapter in PEFT's format, so that PEFT and transformers read it.

``save_adapter`` writes what PEFT's ``save_pretrained`` writes for the same config:

- ``adapter_model.safetensors``: the adapter's tensors keyed ``base_model.model.<module path>.oft_R.weight``
  (OFT) or ``.boft_R`` / ``.boft_s`` (BOFT), in their own dtypes, plus the biases its ``bias`` option
  names (``<path>.base_layer.bias`` for ``"oft_only"``/``"boft_only"``; for ``"all"`` every ``.bias`` entry
  of the model's state dict, as PEFT selects them) and its ``modules_to_save`` copies (``<path>.<name>``).
- ``adapter_config.json``: the config's fields with PEFT's bookkeeping fields (``peft_type``,
  ``peft_version``, ``task_type``, ``base_model_name_or_path``, ``inference_mode``, ...).

``load_adapter`` reads those files, directories saved by PEFT itself, and orthoft's earlier layout
(the same tensors without the ``base_model.model.`` prefix).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from .adapter_checks import check_loaded_tensors, config_from_file, naming_file, read_config, read_tensors
from .config import OrthoftConfig
from .layers.base import check_tensors_fit
from .lycoris_config import LycorisConfig
from .lycoris_files import LYCORIS_FORMATS, is_lycoris_file, load_lycoris, save_lycoris
from .tuner import _check_adapter_name as check_new_adapter_name
from .tuner import (
    adapter_configs,
    delete_adapter,
    get_orthoft_model,
    named_modules_to_save,
    named_orthoft_layers,
)

__all__ = [
    "CONFIG_NAME",
    "PEFT_KEY_PREFIX",
    "PEFT_TASK_TYPES",
    "PEFT_VERSION",
    "WEIGHTS_NAME",
    "adapter_state_dict",
    "load_adapter",
    "save_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT's PeftModel holds the user's model at ``base_model.model``; its files are keyed from there.
PEFT_KEY_PREFIX = "base_model.model."
# The first PEFT release whose OFT Cayley-Neumann series is orthoft's: PEFT 0.18 changed the series and
# warns when an OFT adapter with ``use_cayley_neumann`` comes from an older version (or names none).
PEFT_VERSION = "0.18.0"
# PEFT's ``TaskType`` values (``task_type`` picks the PeftModel subclass that loads the adapter).
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _config_of(model: nn.Module, adapter_name: str) -> OrthoftConfig:
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"{type(model).__name__} has no adapter {adapter_name!r}; it has {list(configs)}.")
    return configs[adapter_name]


def _trained_biases(model: nn.Module, config: OrthoftConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """The base model's biases that the adapter trains, by model path."""
    if config.bias == "none":
        return {}
    if config.bias == config.adapted_bias_only:
        return {
            f"{path}.base_layer.bias": layer.base_layer.bias
            for path, layer in named_orthoft_layers(model)
            if adapter_name in layer.adapter_names and getattr(layer.base_layer, "bias", None) is not None
        }
    # "all": every bias of the model, but not the frozen originals or copies of modules_to_save.
    wrapped = tuple(f"{path}." for path, _ in named_modules_to_save(model))
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if name.rpartition(".")[2] == "bias" and not name.startswith(wrapped)
    }


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The live tensors that ``adapter_name`` trains, under the keys PEFT saves them with."""
    config = _config_of(model, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in named_orthoft_layers(model):
        if adapter_name in layer.adapter_names:
            tensors.update(
                {f"{path}.{key}": value for key, value in layer.adapter_state_dict(adapter_name).items()}
            )
    tensors.update(_trained_biases(model, config, adapter_name))
    for path, wrapper in named_modules_to_save(model):
        if adapter_name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                tensors[f"{path}.{key}"] = value
    return {PEFT_KEY_PREFIX + key: value for key, value in tensors.items()}


def _untrained_peft_biases(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """What PEFT also writes with ``bias="all"``: every ``.bias`` entry of the state dict, among them the
    frozen originals of modules_to_save and their copies under ``<path>.modules_to_save.bias``. None of
    them is read back (PEFT's filter, on the keys of orthoft's model, which has PEFT's module layout)."""
    others = [name for name in adapter_configs(model) if name != adapter_name]
    selected: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        of_other = any(f".{name}." in key or key.endswith(f".{name}") for name in others)
        if of_other or not key.endswith(".bias"):
            continue
        # PEFT drops the adapter name only where it directly precedes the last part of the key.
        head, _, last = key.rpartition(".")
        selected[f"{PEFT_KEY_PREFIX}{head.removesuffix(f'.{adapter_name}')}.{last}"] = value
    return selected


def _name_or_path(model: nn.Module) -> str | None:
    """The model's Hub id or directory (transformers, diffusers); None for a model built from a config."""
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _peft_config_dict(model: nn.Module, config: OrthoftConfig, task_type: str | None) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it: the config's fields plus PEFT's bookkeeping."""
    out = config.to_dict()
    if out.get("target_parameters") is None:
        # PEFT's OFT and BOFT configs have no such field; it is written only where it is used.
        del out["target_parameters"]
    out.update(
        task_type=task_type,
        peft_version=PEFT_VERSION,
        base_model_name_or_path=_name_or_path(model),
        revision=None,
        # PEFT writes True: a loaded adapter is frozen unless asked for (is_trainable=True).
        inference_mode=True,
        # Without a task type PEFT records the model's class, which its AutoPeftModel uses.
        auto_mapping=None
        if task_type is not None
        else {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    )
    return out


def _saved_copy(value: torch.Tensor) -> torch.Tensor:
    # A tensor sharded by FSDP2 (a DTensor) is gathered first; every rank must call then.
    full_tensor = getattr(value, "full_tensor", None)
    full = full_tensor() if callable(full_tensor) else value
    return full.detach().to("cpu", copy=True).contiguous()


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    format: str | None = None,
    task_type: str | None = None,
    is_main_process: bool = True,
) -> None:
    """Write ``adapter_name``'s config and tensors into the directory ``path`` (created if needed), as
    PEFT's ``save_pretrained`` does: ``PeftModel.from_pretrained(model, path)`` and transformers'
    ``model.load_adapter(path)`` read it.

    ``task_type`` is PEFT's (one of ``PEFT_TASK_TYPES``), or None for a plain ``PeftModel``. With FSDP2
    call this on every rank (sharded tensors are gathered) and pass ``is_main_process`` True on one.

    ``format="lycoris"`` or ``"kohya"`` (the default for a ``LycorisConfig`` adapter: ``"lycoris"``) writes
    the one safetensors file ``path`` in LyCORIS's or kohya's naming, as the diffusion tools load it (see
    README); ``model`` may then be a mapping prefix -> model (``orthoft.lycoris_files.save_lycoris``).
    """
    if format is None and isinstance(model, nn.Module):
        format = "lycoris" if isinstance(adapter_configs(model).get(adapter_name), LycorisConfig) else "peft"
    if format in LYCORIS_FORMATS:
        if is_main_process:
            save_lycoris(model, path, adapter_name, format)
        return
    if format not in (None, "peft"):
        raise ValueError(f"format must be 'peft' or one of {LYCORIS_FORMATS}, got {format!r}.")
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {PEFT_TASK_TYPES}, got {task_type!r}.")
    config = _config_of(model, adapter_name)
    if isinstance(config, LycorisConfig):
        raise ValueError(
            f"Adapter {adapter_name!r} is a LycorisConfig one, which PEFT cannot read; save it with "
            "format='lycoris' or 'kohya'."
        )
    tensors = adapter_state_dict(model, adapter_name)
    if config.bias == "all":
        tensors = {**_untrained_peft_biases(model, adapter_name), **tensors}
    saved = {key: _saved_copy(value) for key, value in tensors.items()}
    if not is_main_process:
        return
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # Both files are written whole under other names, then renamed into place: a save cut short (a full
    # disk) leaves the previous adapter as it was, both files of it.
    partial = {name: directory / f".{name}.partial" for name in (WEIGHTS_NAME, CONFIG_NAME)}
    try:
        save_file(saved, partial[WEIGHTS_NAME], metadata={"format": "pt"})
        text = json.dumps(_peft_config_dict(model, config, task_type), indent=2, sort_keys=True)
        partial[CONFIG_NAME].write_text(text, encoding="utf-8")
    except BaseException as error:
        for path in partial.values():
            path.unlink(missing_ok=True)
        if isinstance(error, SafetensorError):  # a full disk, as any other failed write: an OSError
            raise OSError(f"{directory / WEIGHTS_NAME} could not be written: {error}") from error
        raise
    for name, path in partial.items():
        os.replace(path, directory / name)


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The saved tensors under PEFT's keys, and whether they were saved in PEFT's layout (else orthoft's
    earlier one, which had no ``base_model.model.`` prefix)."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in directory.glob("adapter_model.*"))
        found = f" (found {others}; only safetensors files are read)" if others else ""
        raise FileNotFoundError(f"{weights} does not exist{found}.")
    tensors = read_tensors(weights)
    if tensors and all(key.startswith(PEFT_KEY_PREFIX) for key in tensors):
        return tensors, True
    return {PEFT_KEY_PREFIX + key: value for key, value in tensors.items()}, False


def _warn_on_old_neumann_series(data: dict[str, Any], source: Path) -> None:
    # Only PEFT's files can predate 0.18; orthoft's earlier ones always used today's series.
    if data.get("peft_type") != "OFT" or not data.get("use_cayley_neumann", True):
        return
    version = str(data.get("peft_version") or "0").partition("@")[0]
    if tuple(int(part) if part.isdigit() else 0 for part in version.split(".")[:3]) < (0, 18, 0):
        warnings.warn(
            f"{source} holds an OFT adapter with use_cayley_neumann saved by PEFT {version} (0: before 0.18, "
            "which began to record it). PEFT 0.18 changed the Cayley-Neumann series and orthoft computes the "
            "new one, so outputs differ from those it was trained with: retrain it.",
            stacklevel=3,
        )


def _copy_into(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    adapter_name: str,
    source: Path,
    allow_non_finite: bool,
) -> None:
    targets = adapter_state_dict(model, adapter_name)
    if _config_of(model, adapter_name).bias == "all":
        # PEFT writes every ``.bias`` entry (see _untrained_peft_biases); only the trained ones are read.
        tensors = {k: tensor for k, tensor in tensors.items() if k in targets or not k.endswith(".bias")}
    check_tensors_fit(f"Adapter tensors in {source}", targets, tensors)
    check_loaded_tensors(tensors, targets, source, allow_non_finite=allow_non_finite)
    # The layers load their own tensors (in place of meta ones after low_cpu_mem_usage); biases and
    # modules_to_save copies are the model's own parameters.
    loaded: set[str] = set()
    for path, layer in named_orthoft_layers(model):
        if adapter_name in layer.adapter_names:
            prefix = f"{PEFT_KEY_PREFIX}{path}."
            own = {key: tensors[prefix + key] for key in layer.adapter_state_dict(adapter_name)}
            layer.load_adapter_state_dict(adapter_name, own)
            loaded.update(prefix + key for key in own)
    with torch.no_grad():
        for key, target in targets.items():
            if key not in loaded:
                target.copy_(tensors[key])


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    low_cpu_mem_usage: bool = False,
    allow_non_finite: bool = False,
    prefix: str | None = None,
) -> nn.Module:
    """Add the adapter saved in ``path`` (by orthoft or PEFT) to ``model`` as ``adapter_name``; returns it.

    ``model`` is the base model, plain or already carrying other adapters. The tensors load
    strictly: a missing, unexpected or misshapen key is an error naming it, and leaves the model
    as it was. With ``low_cpu_mem_usage`` the adapter tensors are not created before the loaded ones
    take their place. Damaged files, tensors of a non-float dtype and NaN or Inf values are errors
    naming the file and the field or tensor (see ``adapter_checks``); ``allow_non_finite=True`` loads
    NaN and Inf values anyway, to inspect a diverged adapter.

    A ``.safetensors`` file is read as a LyCORIS or kohya file of diag-OFT/BOFT adapters, its names under
    ``prefix`` (``orthoft.lycoris_files.load_lycoris``).
    """
    if is_lycoris_file(path):
        load_lycoris(
            model,
            path,
            adapter_name,
            prefix=prefix,
            low_cpu_mem_usage=low_cpu_mem_usage,
            allow_non_finite=allow_non_finite,
        )
        return model
    directory = Path(path)
    check_new_adapter_name(model, adapter_name)  # not the files' fault: said before reading them
    data = read_config(directory / CONFIG_NAME)
    config = config_from_file(data, directory / CONFIG_NAME)
    tensors, peft_layout = _read_tensors(directory)
    if peft_layout:
        _warn_on_old_neumann_series(data, directory)
    try:
        get_orthoft_model(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    except (ValueError, TypeError) as error:  # the config does not fit the model
        raise naming_file(error, directory / CONFIG_NAME) from None
    try:
        _copy_into(model, tensors, adapter_name, directory / WEIGHTS_NAME, allow_non_finite)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    return model
