"""LyCORIS and kohya files of diag-OFT and BOFT adapters: one safetensors file, keyed by module name.

Each adapted module ``<name>`` has ``<name>.oft_blocks`` (``(D, b, b)``: diag-OFT; ``(m, D, b, b)``:
BOFT), ``<name>.alpha`` (the constraint, 0 for none; always written, as ComfyUI skips a module without
it) and, when rescaled, ``<name>.rescale``. ``<name>`` is the module path with dots as underscores after
a prefix: ``lycoris_`` in LyCORIS's files; ``lora_unet_`` and ``lora_te_`` (``lora_te1_``/``lora_te2_``
for SDXL's two text encoders) in kohya's, which name SDXL's UNet by LDM paths (see ``kohya_names``).

``save_lycoris`` writes one file for one model or for several (a mapping prefix -> model);
``load_lycoris`` builds the adapters a file describes, layer by layer, and copies its tensors. It checks
the file as ``load_adapter`` checks PEFT's (``adapter_checks``): a damaged file, a tensor of an integer,
bool or float8 dtype, NaN or Inf values, a missing ``alpha`` or one that is not a single number >= 0
are errors naming the file and the key, and the models are left unchanged.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter_checks import check_loaded_tensors, read_tensors
from .kohya_names import is_unet, ldm_unet_path, text_encoder_path, uses_ldm_names
from .layers.kinds import kind_of
from .layers.output_side import LycorisLayer
from .lycoris_config import LycorisConfig
from .tuner import adapter_configs, delete_adapter, get_orthoft_model, named_orthoft_layers

__all__ = ["LYCORIS_FORMATS", "is_lycoris_file", "load_lycoris", "module_names", "save_lycoris"]

LYCORIS_FORMATS = ("lycoris", "kohya")
# The tensors of one module in these files.
_PARTS = ("oft_blocks", "alpha", "rescale")
# Prefixes of the model parts in kohya's files, and LyCORIS's own.
_KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
_PREFIXES = ("lycoris", *_KOHYA_PREFIXES)


def default_prefix(model: nn.Module, file_format: str) -> str:
    """``lycoris`` for LyCORIS's files; kohya's: ``lora_unet`` for a diffusers UNet, else ``lora_te``."""
    if file_format == "lycoris":
        return "lycoris"
    return "lora_unet" if is_unet(model) else "lora_te"


def module_names(model: nn.Module, prefix: str) -> dict[str, str]:
    """File name -> module path of every module of ``model`` that orthoft can adapt, under ``prefix``."""
    ldm = prefix == "lora_unet" and is_unet(model) and uses_ldm_names(model)
    names: dict[str, str] = {}
    for path, module in model.named_modules():
        base = module.base_layer if isinstance(module, LycorisLayer) else module
        if not path or kind_of(base) is None or ".base_layer" in f".{path}":
            continue
        if ldm:
            named = ldm_unet_path(path, model.config)
        elif prefix.startswith("lora_te"):
            named = text_encoder_path(model, path)
        else:
            named = path
        if named is not None:
            names[f"{prefix}_{named.replace('.', '_')}"] = path
    return names


def _models(models: nn.Module | Mapping[str, nn.Module], file_format: str) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {default_prefix(models, file_format): models}
    unknown = sorted(set(models) - set(_PREFIXES))
    if unknown:
        raise ValueError(f"Unknown model prefixes {unknown}; valid: {list(_PREFIXES)}.")
    return dict(models)


def _layer_tensors(layer: LycorisLayer, adapter_name: str) -> tuple[dict[str, torch.Tensor], str]:
    adapter = layer.lycoris[adapter_name]
    options = layer.adapter_options[adapter_name]
    tensors = {
        "oft_blocks": adapter.oft_blocks,
        # LyCORIS keeps the constraint per output feature as a float32 scalar buffer.
        "alpha": torch.tensor(options.constraint, dtype=torch.float32),
    }
    if adapter.rescale is not None:
        tensors["rescale"] = adapter.rescale
    return tensors, options.algo


def save_lycoris(
    models: nn.Module | Mapping[str, nn.Module],
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    file_format: str = "lycoris",
) -> None:
    """Write ``adapter_name`` of ``models`` into the safetensors file ``path`` in LyCORIS's or kohya's naming.

    ``models`` is one model (prefix ``lycoris``, or for kohya ``lora_unet`` for a diffusers UNet and
    ``lora_te`` otherwise) or a mapping prefix -> model (``{"lora_unet": unet, "lora_te1": te1,
    "lora_te2": te2}``) for one file holding several. Every adapter of ``adapter_name`` must be a
    ``LycorisConfig`` one.
    """
    if file_format not in LYCORIS_FORMATS:
        raise ValueError(f"format must be one of {LYCORIS_FORMATS}, got {file_format!r}.")
    saved: dict[str, torch.Tensor] = {}
    algos: set[str] = set()
    for prefix, model in _models(models, file_format).items():
        config = adapter_configs(model).get(adapter_name)
        if not isinstance(config, LycorisConfig):
            raise ValueError(
                f"{type(model).__name__}'s adapter {adapter_name!r} is a {type(config).__name__}; "
                "LyCORIS and kohya files hold LycorisConfig adapters (diag-OFT, BOFT on the output features)."
            )
        names = {module_path: name for name, module_path in module_names(model, prefix).items()}
        for module_path, layer in named_orthoft_layers(model):
            if not isinstance(layer, LycorisLayer) or adapter_name not in layer.adapter_names:
                continue
            if module_path not in names:
                raise ValueError(
                    f"Module '{module_path}' has no name in {file_format} files under prefix {prefix!r}."
                )
            tensors, algo = _layer_tensors(layer, adapter_name)
            algos.add(algo)
            for part, value in tensors.items():
                saved[f"{names[module_path]}.{part}"] = value.detach().to("cpu", copy=True).contiguous()
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": ",".join(sorted(algos))}),
    }
    save_file(saved, os.fspath(path), metadata=metadata)


def is_lycoris_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a safetensors file (rather than a PEFT adapter directory), existing or not."""
    return Path(path).suffix == ".safetensors" and not Path(path).is_dir()


def _group(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors by module name, each checked to be a diag-OFT/BOFT part."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if part not in _PARTS:
            raise ValueError(
                f"{source}: key {key!r} is not a diag-OFT/BOFT tensor (orthoft reads {', '.join(_PARTS)}); "
                "it belongs to another LyCORIS algorithm or format. The model is unchanged."
            )
        grouped.setdefault(name, {})[part] = value
    for name, parts in grouped.items():
        if "oft_blocks" not in parts:
            raise ValueError(f"{source}: module {name!r} has {sorted(parts)} but no {name}.oft_blocks.")
        shape = parts["oft_blocks"].shape
        if len(shape) not in (3, 4) or shape[-1] != shape[-2] or shape[-1] < 2:
            raise ValueError(
                f"{source}: {name}.oft_blocks has shape {tuple(parts['oft_blocks'].shape)}; "
                "expected (D, b, b) (diag-OFT) or (m, D, b, b) (BOFT), blocks b x b with b >= 2."
            )
    return grouped


def _constraint(name: str, parts: dict[str, torch.Tensor], source: str, allow_non_finite: bool) -> float:
    """The module's ``alpha``: one floating value >= 0 (0: no constraint)."""
    key = f"{name}.alpha"
    alpha = parts.get("alpha")
    if alpha is None:
        # LyCORIS fails on such a module and ComfyUI skips it: no loader agrees on what it means.
        raise ValueError(
            f"{source}: module {name!r} has no {key} (its constraint, 0 for none), which LyCORIS cannot "
            f"read and ComfyUI skips; add {key} = 0 to load it without a constraint. The model is unchanged."
        )
    if alpha.dim() != 0:
        raise ValueError(f"{source}: {key} has shape {tuple(alpha.shape)}; expected one value of shape ().")
    check_loaded_tensors(
        {key: alpha},
        {key: torch.empty((), dtype=torch.float32)},
        Path(source),
        allow_non_finite=allow_non_finite,
    )
    value = float(alpha)
    if not value >= 0:
        raise ValueError(f"{source}: {key} is {value}; the constraint must be a number >= 0 (0: none).")
    return value


def _options(
    name: str, parts: dict[str, torch.Tensor], source: str, allow_non_finite: bool
) -> dict[str, Any]:
    blocks = parts["oft_blocks"]
    return {
        "algo": "diag-oft" if blocks.dim() == 3 else "boft",
        "block_size": blocks.shape[-1],
        "constraint": _constraint(name, parts, source, allow_non_finite),
        "rescaled": "rescale" in parts,
    }


def _prefix_of(model: nn.Module, names: list[str], source: str) -> str:
    """The prefix under which ``model``'s names appear in a file with ``names``, when not given."""
    found = sorted({prefix for prefix in _PREFIXES if any(name.startswith(f"{prefix}_") for name in names)})
    if "lycoris" in found:
        return "lycoris"
    if is_unet(model):
        return "lora_unet"
    candidates = [prefix for prefix in found if prefix.startswith("lora_te")]
    if len(candidates) != 1:
        raise ValueError(
            f"{source}: cannot tell which names belong to {type(model).__name__}: they start with "
            f"{found or sorted({name.split('_')[0] for name in names})}; "
            f"pass prefix= (one of {list(_PREFIXES)}) or a mapping prefix -> model."
        )
    return candidates[0]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def load_lycoris(
    models: nn.Module | Mapping[str, nn.Module],
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    prefix: str | None = None,
    low_cpu_mem_usage: bool = False,
    allow_non_finite: bool = False,
) -> nn.Module | Mapping[str, nn.Module]:
    """Add the diag-OFT/BOFT adapters of the LyCORIS or kohya file ``path`` to ``models`` as ``adapter_name``.

    ``models`` is one model, whose names are read under ``prefix`` (default: ``lycoris`` if the file has
    it, else ``lora_unet`` for a diffusers UNet, else the file's one ``lora_te*`` prefix), or a mapping
    prefix -> model (``{"lora_unet": unet, "lora_te": text_encoder}``). Names under those prefixes that
    match no module are skipped with a warning listing them (names under other prefixes belong to other
    models); a damaged file, a key of another algorithm, a misshapen tensor, one of a non-float dtype, NaN
    or Inf values (unless ``allow_non_finite``), an ``alpha`` missing or not a single number >= 0, or a
    file matching no module is an error naming the file and key, and the models are left unchanged. With
    ``low_cpu_mem_usage`` the adapter tensors are not created before the loaded ones take their place.
    """
    source = os.fspath(path)
    if not Path(source).is_file():
        raise FileNotFoundError(f"{source} does not exist.")
    grouped = _group(read_tensors(Path(source)), source)
    if isinstance(models, nn.Module):
        parts = {prefix or _prefix_of(models, list(grouped), source): models}
    else:
        parts = _models(models, "kohya")
    matched = {}
    for part_prefix, model in parts.items():
        known = module_names(model, part_prefix)
        matched[part_prefix] = {name: known[name] for name in grouped if name in known}
    if not any(matched.values()):
        expected = {p: next(iter(module_names(m, p)), "none") for p, m in parts.items()}
        raise ValueError(
            f"{source}: no module name matches under prefixes {list(parts)} (file names: "
            f"{_listed(sorted(grouped))}; expected names such as {expected}). The model is unchanged."
        )
    loaded = {name for names in matched.values() for name in names}
    unmatched = sorted(
        name for name in set(grouped) - loaded if name.startswith(tuple(f"{p}_" for p in parts))
    )
    if unmatched:
        owners = ", ".join(type(model).__name__ for model in parts.values())
        warnings.warn(
            f"{source}: {len(unmatched)} modules match nothing in {owners}: {_listed(unmatched)}",
            stacklevel=3,
        )
    done: list[nn.Module] = []
    try:
        for part_prefix, model in parts.items():
            if matched[part_prefix]:
                _load_into(
                    model,
                    grouped,
                    matched[part_prefix],
                    adapter_name,
                    source,
                    low_cpu_mem_usage,
                    allow_non_finite,
                )
                done.append(model)
    except BaseException:
        for model in done:
            delete_adapter(model, adapter_name)
        raise
    return models


def _load_into(
    model: nn.Module,
    grouped: dict[str, dict[str, torch.Tensor]],
    matched: dict[str, str],
    adapter_name: str,
    source: str,
    low_cpu_mem_usage: bool,
    allow_non_finite: bool,
) -> None:
    """One model's adapters, built from the options the file implies per module, then its tensors."""
    overrides = {
        module_path: _options(name, grouped[name], source, allow_non_finite)
        for name, module_path in matched.items()
    }
    try:  # options the tensors imply can be invalid (a block size of 1, an odd one for BOFT)
        config = LycorisConfig(
            target_modules="|".join(_escaped(module_path) for module_path in overrides),
            layer_overrides=overrides,
            **next(iter(overrides.values())),
        )
        get_orthoft_model(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    try:
        _copy_tensors(model, grouped, matched, adapter_name, source, allow_non_finite)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise


def _escaped(module_path: str) -> str:
    return "".join(f"\\{c}" if c in ".^$*+?{}[]\\|()" else c for c in module_path)


def _copy_tensors(
    model: nn.Module,
    grouped: dict[str, dict[str, torch.Tensor]],
    matched: dict[str, str],
    adapter_name: str,
    source: str,
    allow_non_finite: bool,
) -> None:
    layers = dict(named_orthoft_layers(model))
    for name, module_path in matched.items():
        layer = layers[module_path]
        parts = grouped[name]
        own = layer.adapter_state_dict(adapter_name)
        tensors = {"lycoris.oft_blocks": parts["oft_blocks"]}
        if "rescale" in parts:
            target = own["lycoris.rescale"]
            # LyCORIS shapes it like the weight ((out, 1) or (out, 1, 1, 1)); any layout of out values reads.
            rescale = parts["rescale"]
            tensors["lycoris.rescale"] = (
                rescale.reshape(target.shape) if rescale.numel() == target.numel() else rescale
            )
        # Dtypes and values, under the file's keys: before anything of this module is copied.
        in_file = {key: f"{name}.{key.partition('.')[2]}" for key in tensors}
        check_loaded_tensors(
            {in_file[key]: value for key, value in tensors.items()},
            {in_file[key]: own[key] for key in tensors if key in own},
            Path(source),
            allow_non_finite=allow_non_finite,
        )
        try:
            layer.load_adapter_state_dict(adapter_name, tensors)
        except ValueError as error:
            raise ValueError(f"{source}: module {name!r} ('{module_path}'): {error}") from None
