"""Saving and loading one adapter as PEFT lays it out on disk.

A directory holds ``adapter_config.json`` (the config's ``to_dict``, with ``peft_type``) and
``adapter_model.safetensors`` with only that adapter's tensors, keyed by module path without the
adapter name (``<path>.oft_R.weight``, ``<path>.boft_R``, ``<path>.boft_s``), plus the biases its
``bias`` option trains (``<path>.base_layer.bias``, ...) and its ``modules_to_save`` copies
(``<path>.<name>``). PEFT-saved OFT / BOFT directories, whose keys carry a ``base_model.model.``
prefix, load as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import OrthoftConfig
from .tuner import (
    adapter_configs,
    delete_adapter,
    get_orthoft_model,
    layer_adapter_names,
    named_modules_to_save,
    named_orthoft_layers,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_state_dict", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_KEY_PREFIX = "base_model.model."


def _config_of(model: nn.Module, adapter_name: str) -> OrthoftConfig:
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"{type(model).__name__} has no adapter {adapter_name!r}; it has {list(configs)}.")
    return configs[adapter_name]


def _bias_parameters(model: nn.Module, config: OrthoftConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    if config.bias == "none":
        return {}
    if config.bias == config.adapted_bias_only:
        return {
            f"{path}.base_layer.bias": layer.base_layer.bias
            for path, layer in named_orthoft_layers(model)
            if adapter_name in layer_adapter_names(layer) and layer.base_layer.bias is not None
        }
    # "all": every bias of the model, but not the frozen originals or copies of modules_to_save.
    wrapped = tuple(f"{path}." for path, _ in named_modules_to_save(model))
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if name.rpartition(".")[2] == "bias" and not name.startswith(wrapped)
    }


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The live tensors of one adapter under the keys they are saved with."""
    config = _config_of(model, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in named_orthoft_layers(model):
        if adapter_name not in layer_adapter_names(layer):
            continue
        for attribute in layer.adapter_parameter_names:
            entry = getattr(layer, attribute)[adapter_name]
            if isinstance(entry, torch.Tensor):
                tensors[f"{path}.{attribute}"] = entry
            else:
                for key, value in entry.state_dict(keep_vars=True).items():
                    tensors[f"{path}.{attribute}.{key}"] = value
    tensors.update(_bias_parameters(model, config, adapter_name))
    for path, wrapper in named_modules_to_save(model):
        if adapter_name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                tensors[f"{path}.{key}"] = value
    return tensors


def save_adapter(model: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default") -> None:
    """Write ``adapter_name``'s config and tensors into the directory ``path`` (created if needed)."""
    config = _config_of(model, adapter_name)
    tensors = {
        key: value.detach().to("cpu", copy=True).contiguous()
        for key, value in adapter_state_dict(model, adapter_name).items()
    }
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    with open(directory / CONFIG_NAME, "w", encoding="utf-8") as file:
        json.dump(config.to_dict(), file, indent=2, sort_keys=True)
        file.write("\n")


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The saved tensors under orthoft's keys, and whether PEFT saved them."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in directory.glob("adapter_model.*"))
        found = f" (found {others}; only safetensors files are read)" if others else ""
        raise FileNotFoundError(f"{weights} does not exist{found}.")
    tensors = load_file(weights)
    from_peft = bool(tensors) and all(key.startswith(_PEFT_KEY_PREFIX) for key in tensors)
    if from_peft:
        tensors = {key.removeprefix(_PEFT_KEY_PREFIX): value for key, value in tensors.items()}
    return tensors, from_peft


def _without_peft_wrapper_biases(
    model: nn.Module, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PEFT with ``bias="all"`` also saves the biases inside its modules_to_save wrappers
    (``<path>.original_module.bias``: the base model's; ``<path>.modules_to_save.bias``: a copy of
    ``<path>.bias``); neither is a tensor of the adapter."""
    inner = tuple(
        f"{path}.{part}."
        for path, _ in named_modules_to_save(model)
        for part in ("original_module", "modules_to_save")
    )
    return {key: value for key, value in tensors.items() if not key.startswith(inner)}


def _listed(keys: set[str]) -> str:
    ordered = sorted(keys)
    return ", ".join(ordered[:20]) + (f", ... ({len(ordered)} in all)" if len(ordered) > 20 else "")


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str, source: Path) -> None:
    targets = adapter_state_dict(model, adapter_name)
    missing, unexpected = set(targets) - set(tensors), set(tensors) - set(targets)
    if missing or unexpected:
        raise ValueError(
            f"Adapter tensors in {source} do not fit the model: missing keys [{_listed(missing)}], "
            f"unexpected keys [{_listed(unexpected)}]."
        )
    for key, target in targets.items():
        if tensors[key].shape != target.shape:
            raise ValueError(
                f"Adapter tensor {key!r} in {source} has shape {tuple(tensors[key].shape)}, the model's "
                f"{tuple(target.shape)}."
            )
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])


def load_adapter(model: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default") -> nn.Module:
    """Add the adapter saved in ``path`` to ``model`` as ``adapter_name``; returns ``model``.

    ``model`` is the base model, plain or already carrying other adapters. The tensors load
    strictly: a missing, unexpected or misshapen key is an error naming it, and leaves the model
    as it was.
    """
    directory = Path(path)
    with open(directory / CONFIG_NAME, encoding="utf-8") as file:
        config = OrthoftConfig.from_dict(json.load(file))
    tensors, from_peft = _read_tensors(directory)
    get_orthoft_model(model, config, adapter_name)
    if from_peft and config.bias == "all":
        tensors = _without_peft_wrapper_biases(model, tensors)
    try:
        _copy_into(model, tensors, adapter_name, directory / WEIGHTS_NAME)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    return model
