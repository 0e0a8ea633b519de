"""Export orthoft adapters to PEFT LoRA adapters, for servers and tools that load LoRA only.

For each adapted layer the delta ``W' - W`` (the merged weight minus the base weight, as ``merge``
computes it: BOFT's output scale included, against the dequantized weight of a quantized base) is
factored as ``lora_B @ lora_A`` by ``low_rank.factorize``, one layer at a time and on the layer's
device. ``lora_alpha`` equals the rank, so PEFT's scale is 1 and ``W + lora_B @ lora_A`` is the
approximation of ``W'``. At full rank the factors are exact.

The LoRA layouts are PEFT's:

- Linear and quantized linears: ``lora_A.weight`` ``(r, in)``, ``lora_B.weight`` ``(out, r)``; transformers'
  ``Conv1D`` the same (PEFT's LoRA transposes for ``fan_in_fan_out``).
- Conv2d: ``lora_A`` a convolution with the base's kernel, stride, padding and dilation over all
  input channels, ``(r, in, kh, kw)``; ``lora_B`` a 1x1 convolution with the base's groups,
  ``(out, r/groups, 1, 1)``. With groups each group of outputs gets ``r/groups`` ranks, and ``lora_A``
  is zero outside the group's inputs.
- Embedding: ``lora_embedding_A`` ``(r, num_embeddings)``, ``lora_embedding_B`` ``(embedding_dim, r)``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter_io import PEFT_KEY_PREFIX, PEFT_TASK_TYPES, WEIGHTS_NAME, _name_or_path
from .layers import OrthoftLayer
from .layers.base import compute_dtype
from .lora_report import LayerExport, LoraExportReport
from .low_rank import SVD_MODES, Factors, factorize
from .tuner import active_adapters, adapter_configs, named_modules_to_save, named_orthoft_layers

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["LoraExport", "convert_to_lora", "save_as_lora"]

# The randomized SVD draws from a generator of its own with this seed: exports are reproducible.
_SEED = 0


class LoraExport(NamedTuple):
    """What ``convert_to_lora`` returns: PEFT's ``LoraConfig``, the LoRA tensors under the keys PEFT saves
    them with, and the per-layer report."""

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    report: LoraExportReport


def _check_rank(rank: object) -> None:
    valid = "an int >= 1 or a float in (0, 1] (the fraction of each layer's squared singular values kept)"
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"convert_to_lora: rank must be {valid}, got {rank!r}")
    if (isinstance(rank, int) and rank < 1) or (isinstance(rank, float) and not 0.0 < rank <= 1.0):
        raise ValueError(f"convert_to_lora: rank must be {valid}, got {rank!r}")


def _selected_adapters(model: nn.Module, adapter_name: str | Sequence[str] | None) -> list[str]:
    """The adapters to export, composed in this order: one name, a list, or None for the active ones."""
    configs = adapter_configs(model)
    names = active_adapters(model) if adapter_name is None else adapter_name
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in configs]
    if unknown or not names:
        raise ValueError(
            f"convert_to_lora: adapter_name must name adapters of the model, got {adapter_name!r}; "
            f"its adapters: {list(configs)}"
        )
    for name in names:
        bias = configs[name].bias
        if bias != "none":
            raise ValueError(
                f"convert_to_lora: adapter {name!r} trains biases (bias={bias!r}), which a LoRA adapter "
                "cannot carry: it trained the base model's own biases in place; export adapters with "
                "bias='none'"
            )
    if len(names) > 1 and any(configs[name].modules_to_save for name in names):
        raise ValueError(
            f"convert_to_lora: adapters {names} compose, but a LoRA adapter holds one set of "
            "modules_to_save; export an adapter with modules_to_save on its own"
        )
    return names


def _groups(layer: OrthoftLayer) -> int:
    return layer.base_layer.groups if layer.family == "conv2d" else 1


def _check_layer(layer: OrthoftLayer, rank: int | float) -> None:
    """Everything that can fail for ``layer``, before anything is computed."""
    if layer.merged:
        raise ValueError(
            f"convert_to_lora: {layer.label}: adapters {layer.merged_adapters} are merged into the base "
            "weight; unmerge them first (layer.unmerge())"
        )
    layer.check_mergeable()
    for parameter in layer.parameters():
        if parameter.is_meta:
            raise ValueError(
                f"convert_to_lora: {layer.label} holds adapter tensors without values "
                "(low_cpu_mem_usage=True); load them first"
            )
    groups = _groups(layer)
    if groups > 1 and isinstance(rank, int):
        max_rank = groups * min(layer.out_features // groups, layer.filter_size)
        if rank < max_rank and rank % groups:
            raise ValueError(
                f"convert_to_lora: {layer.label} has groups={groups}, and PEFT's LoRA Conv2d takes only "
                f"ranks divisible by groups: rank {rank} is not; use a multiple of {groups} (or at least "
                f"the layer's full rank {max_rank})"
            )


def _delta(layer: OrthoftLayer, names: list[str]) -> tuple[torch.Tensor, torch.dtype]:
    """The layer's ``W' - W`` as ``(groups, rows, F)`` matrices in ``compute_dtype``, and the base dtype.

    ``rows`` are the outputs of a group (Linear, Conv2d) or the embedding rows; reusing the merge path
    (``_adapted_weight_matrix``) keeps the export equal to what ``merge`` writes.
    """
    weight = layer._unmerged_base_weight()
    base = layer._weight_matrix(weight).to(compute_dtype(weight.dtype))
    delta = layer._adapted_weight_matrix(weight, names, training=False) - base
    groups = _groups(layer)
    return delta.reshape(groups, delta.shape[0] // groups, delta.shape[1]), weight.dtype


def _lora_tensors(layer: OrthoftLayer, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's LoRA tensors of ``layer`` from factors ``left`` ``(g, rows, k)`` and ``right`` ``(g, k, F)``."""
    if layer.family == "embedding":
        return {"lora_embedding_A": left[0].mT.contiguous(), "lora_embedding_B": right[0].mT.contiguous()}
    if layer.family == "linear":
        return {"lora_A.weight": right[0].contiguous(), "lora_B.weight": left[0].contiguous()}
    base = layer.base_layer
    groups, rank = left.shape[0], left.shape[-1]
    group_inputs = base.in_channels // groups
    kernel = right.reshape(groups, rank, group_inputs, *base.kernel_size)
    if groups == 1:
        lora_a = kernel[0]
    else:
        # lora_A convolves all input channels: each group's rows see only that group's inputs.
        lora_a = right.new_zeros(groups * rank, base.in_channels, *base.kernel_size)
        for group in range(groups):
            inputs = slice(group * group_inputs, (group + 1) * group_inputs)
            lora_a[group * rank : (group + 1) * rank, inputs] = kernel[group]
    lora_b = left.reshape(base.out_channels, rank, 1, 1)
    return {"lora_A.weight": lora_a.contiguous(), "lora_B.weight": lora_b.contiguous()}


def _relative_error(delta: torch.Tensor, factors: Factors, dtype: torch.dtype) -> float:
    """The error of the factors as stored (cast to ``dtype``)."""
    stored = factors.left.to(dtype).to(delta.dtype) @ factors.right.to(dtype).to(delta.dtype)
    norm = torch.linalg.vector_norm(delta)
    if norm == 0:
        return 0.0
    return float(torch.linalg.vector_norm(delta - stored) / norm)


def _pattern_names(paths: list[str], model: nn.Module) -> tuple[list[str] | str, dict[str, str]]:
    """``target_modules`` and the ``rank_pattern`` key of each exported path.

    PEFT matches a listed name to every module whose path ends with it: plain paths unless one of them
    ends another module's path, then a regex of exactly these paths and anchored pattern keys.
    """
    module_paths = [name for name, _ in model.named_modules() if name]
    exported = set(paths)
    ambiguous = any(
        other != path and other.endswith(f".{path}") for path in exported for other in module_paths
    )
    if not ambiguous:
        return sorted(paths), {path: path for path in paths}
    target = "(" + "|".join(re.escape(path) for path in sorted(paths)) + ")"
    return target, {path: "^" + re.escape(path) for path in paths}


def _lora_config(
    model: nn.Module,
    ranks: dict[str, int],
    fan_in_fan_out: bool,
    names: list[str],
    task_type: str | None,
) -> LoraConfig:
    from peft import LoraConfig

    rank = Counter(ranks.values()).most_common(1)[0][0]
    target_modules, keys = _pattern_names(list(ranks), model)
    pattern = {keys[path]: layer_rank for path, layer_rank in ranks.items() if layer_rank != rank}
    config = adapter_configs(model)[names[-1]]
    modules_to_save = config.modules_to_save
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=target_modules,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
        base_model_name_or_path=_name_or_path(model),
        inference_mode=True,
    )


def _modules_to_save_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's ``modules_to_save`` copies, keyed as PEFT saves them (also for LoRA)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, wrapper in named_modules_to_save(model):
        if adapter_name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                tensors[f"{PEFT_KEY_PREFIX}{path}.{key}"] = value.detach()
    return tensors


def convert_to_lora(
    model: nn.Module,
    rank: int | float,
    adapter_name: str | Sequence[str] | None = "default",
    *,
    svd: str = "auto",
    dtype: torch.dtype | None = None,
    task_type: str | None = None,
    progressbar: bool = True,
) -> LoraExport:
    """A PEFT LoRA adapter that approximates ``adapter_name`` of an orthoft ``model``, layer by layer.

    Args:
        rank: an int, the rank of every layer (a layer whose full rank ``min(out, F)`` is lower gets its
            full rank, and is exact; the report says which), or a float in (0, 1]: each layer keeps the
            fewest singular values that hold this fraction of its delta's squared singular values (1.0:
            exact). Per-layer ranks go to ``rank_pattern``/``alpha_pattern``; ``lora_alpha`` equals the rank.
        adapter_name: one adapter, a list of adapters composed in that order (as when they are all active),
            or None for the model's active adapters.
        svd: ``"auto"`` (the eigendecomposition of the delta's smaller Gram matrix: the truncated SVD's
            factors and error, to float rounding, at about a quarter of its cost), ``"exact"`` (LAPACK's
            SVD) or ``"randomized"`` (a block Krylov method, int ranks only; a layer where its space would
            outgrow three quarters of the full rank gets the exact SVD, and the report says so). At full
            rank no SVD runs.
        dtype: of the LoRA tensors; default the base weight's (the dequantized one for quantized bases).
        task_type: PEFT's task type for the config (see ``orthoft.save_adapter``).
        progressbar: show a tqdm progress bar over the layers.

    Returns:
        ``LoraExport(config, state_dict, report)``: PEFT's ``LoraConfig``, the tensors keyed
        ``base_model.model.<path>.lora_A.weight`` (``lora_embedding_A`` for embeddings), on the layers'
        devices, plus the adapter's ``modules_to_save`` copies, and a ``LoraExportReport``.

    Raises ``TypeError``/``ValueError`` for a bad rank, unknown adapter, merged adapters, adapters that
    train biases, a grouped convolution whose groups do not divide the rank, or a layer whose weight
    cannot be read (a forward-only quantized kind); the model is never changed.
    """
    from tqdm.auto import tqdm

    _check_rank(rank)
    if svd not in SVD_MODES:
        raise ValueError(f"convert_to_lora: svd must be one of {SVD_MODES}, got {svd!r}")
    if svd == "randomized" and isinstance(rank, float):
        raise ValueError(f"convert_to_lora: svd='randomized' needs an int rank, got rank={rank!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"convert_to_lora: dtype must be None or a floating torch.dtype, got {dtype!r}")
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise ValueError(
            f"convert_to_lora: task_type must be None or one of {PEFT_TASK_TYPES}, got {task_type!r}"
        )
    names = _selected_adapters(model, adapter_name)
    targets = [
        (path, layer, held)
        for path, layer in named_orthoft_layers(model)
        if (held := [name for name in names if name in layer.adapter_names])
    ]
    if not targets:
        raise ValueError(f"convert_to_lora: no layer of the model holds adapters {names}")
    for _, layer, _ in targets:
        _check_layer(layer, rank)

    state_dict: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    exported: list[LayerExport] = []
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for path, layer, held in tqdm(
            targets, desc="Exporting to LoRA", unit="layer", disable=not progressbar
        ):
            delta, base_dtype = _delta(layer, held)
            if delta.device not in generators:
                generators[delta.device] = torch.Generator(delta.device).manual_seed(_SEED)
            groups = delta.shape[0]
            per_group = rank // groups if isinstance(rank, int) else rank
            factors = factorize(delta, per_group, svd, generators[delta.device])
            stored_dtype = dtype or base_dtype
            error = _relative_error(delta, factors, stored_dtype)
            tensors = _lora_tensors(layer, factors.left.to(stored_dtype), factors.right.to(stored_dtype))
            state_dict.update({f"{PEFT_KEY_PREFIX}{path}.{key}": value for key, value in tensors.items()})
            layer_rank = groups * factors.rank
            max_rank = groups * min(delta.shape[1:])
            ranks[path] = layer_rank
            capped = isinstance(rank, int) and rank > max_rank
            shape = (delta.shape[0] * delta.shape[1], delta.shape[2])
            exported.append(
                LayerExport(
                    path, layer.base_kind.name, shape, layer_rank, max_rank, factors.method, error, capped
                )
            )
            del delta, factors
        if len(names) == 1:
            state_dict.update(_modules_to_save_tensors(model, names[0]))
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer, _ in targets)
    config = _lora_config(model, ranks, fan_in_fan_out, names, task_type)
    return LoraExport(config, state_dict, LoraExportReport(rank, tuple(exported)))


def save_as_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    rank: int | float,
    adapter_name: str | Sequence[str] | None = "default",
    **options: Any,
) -> LoraExportReport:
    """``convert_to_lora`` written as PEFT writes a LoRA adapter: ``adapter_config.json`` and
    ``adapter_model.safetensors`` in the directory ``path`` (created if needed).

    ``PeftModel.from_pretrained``, transformers' ``load_adapter`` and diffusers'
    ``load_lora_adapter(path, prefix="base_model.model")`` read it. ``options`` are ``convert_to_lora``'s;
    returns the report.
    """
    config, state_dict, report = convert_to_lora(model, rank, adapter_name, **options)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    saved = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    save_file(saved, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    config.save_pretrained(str(directory))  # adapter_config.json
    return report
