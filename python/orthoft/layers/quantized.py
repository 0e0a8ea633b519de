"""Quantized linear layers as base-layer kinds (QOFT): bitsandbytes, torchao, HQQ, and forward-only ones.

orthoft rotates the activations (``y = base(x @ R)``), so training needs nothing from a quantized layer
but its forward pass: the quantized storage is never dequantized or touched. Merging dequantizes,
rotates in float32 and requantizes with the layer's own settings; unmerging puts the original storage
objects back, so it is exact.

None of the quantization packages is imported here. A module can only be an instance of a package's
class once that package is loaded, so each matcher first looks the package up in ``sys.modules``; the
kinds are registered whether or not the packages are installed, and error messages list them all.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .kinds import BaseLayerKind, register_kind


def _loaded_class(module_name: str, class_name: str) -> type | None:
    """``module_name.class_name`` if that module is already imported, else ``None``."""
    return getattr(sys.modules.get(module_name), class_name, None)


def _is_instance(module: nn.Module, module_name: str, class_name: str) -> bool:
    cls = _loaded_class(module_name, class_name)
    return cls is not None and isinstance(module, cls)


def _forward_without_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized forward minus the bias (BOFT's scale applies to ``x @ W.T`` only), as PEFT does."""
    out = module(x)
    bias = getattr(module, "bias", None)
    return out if bias is None else out - bias.to(out.dtype)


def _weight_device(module: nn.Module) -> torch.device:
    return module.weight.device


def _linear_features(module: nn.Module) -> tuple[int, int]:
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    # auto-gptq's and some AWQ layers' names.
    return module.infeatures, module.outfeatures


# ---------------------------------------------------------------------------------------------
# bitsandbytes: Linear4bit (nf4, fp4) and Linear8bitLt


def _bnb4_state(module: nn.Module) -> Any:
    return module.weight.quant_state


def _bnb4_dtype(module: nn.Module) -> torch.dtype:
    state = _bnb4_state(module)
    if state is None:  # not quantized yet: still the float weight
        return module.weight.dtype
    # bitsandbytes' CPU inference repacking keeps the original dtype aside.
    return getattr(state, "original_dtype", None) or state.dtype


def _bnb4_weight(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    state = weight.quant_state
    if state is None:
        return weight.data
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        # An inference forward on CPU repacks the storage in place; unpack a copy, leave the layer as is.
        data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(
            data.clone(), copy.deepcopy(state)
        )
    return bnb_functional.dequantize_4bit(data, state)


def _bnb4_write(module: nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = module.weight
    # Params4bit quantizes when moved to a device, with the old parameter's settings.
    module.weight = bnb.nn.Params4bit(
        weight.contiguous(),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=module,
    ).to(old.device)


def _bnb4_save(module: nn.Module) -> Any:
    # write_weight installs a new parameter: the old one stays as it is.
    return module.weight


def _bnb4_restore(module: nn.Module, saved: Any) -> None:
    module.weight = saved
    module.quant_state = saved.quant_state


def _bnb8_weight(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    if weight.data.dtype != torch.int8:  # has_fp16_weights: a float weight
        return weight.data
    # The row scales sit on the weight until the first forward moves them to the layer's state.
    scales = module.state.SCB if module.state.SCB is not None else weight.SCB
    return bnb_functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def _bnb8_dtype(module: nn.Module) -> torch.dtype:
    data = module.weight.data
    return data.dtype if data.dtype.is_floating_point else torch.float32


def _bnb8_write(module: nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = module.weight
    # Int8Params quantizes when moved to a device; the layer's state must forget the old int8 data.
    module.weight = bnb.nn.Int8Params(
        weight.contiguous().to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
    ).to(old.device)
    module.state.reset_grads()


def _bnb8_save(module: nn.Module) -> Any:
    return module.weight, module.state.CB, module.state.SCB


def _bnb8_restore(module: nn.Module, saved: Any) -> None:
    module.weight, module.state.CB, module.state.SCB = saved


def register_bitsandbytes() -> None:
    register_kind(
        BaseLayerKind(
            name="bitsandbytes Linear4bit",
            family="linear",
            matches=lambda module: _is_instance(module, "bitsandbytes.nn", "Linear4bit"),
            run_without_bias=_forward_without_bias,
            weight=_bnb4_weight,
            write_weight=_bnb4_write,
            save_weight=_bnb4_save,
            restore_weight=_bnb4_restore,
            dtype=_bnb4_dtype,
            device=_weight_device,
        ),
        before="torch.nn.Linear",
    )
    register_kind(
        BaseLayerKind(
            name="bitsandbytes Linear8bitLt",
            family="linear",
            matches=lambda module: _is_instance(module, "bitsandbytes.nn", "Linear8bitLt"),
            run_without_bias=_forward_without_bias,
            weight=_bnb8_weight,
            write_weight=_bnb8_write,
            save_weight=_bnb8_save,
            restore_weight=_bnb8_restore,
            dtype=_bnb8_dtype,
            device=_weight_device,
        ),
        before="torch.nn.Linear",
    )


# ---------------------------------------------------------------------------------------------
# torchao: nn.Linear whose weight is a torchao tensor subclass


def _torchao_weight_class(module: nn.Module) -> type | None:
    base = _loaded_class("torchao.utils", "TorchAOBaseTensor")
    weight = getattr(module, "weight", None)
    return type(weight) if base is not None and isinstance(weight, base) else None


def _symmetric(weight: Any) -> bool:
    # torchao does not record the mapping type; a symmetric scheme stores no or all-zero zero points.
    zero_point = weight.zero_point
    return zero_point is None or not bool(zero_point.any())


def _torchao_int8(weight: Any, dense: torch.Tensor) -> Any:
    from torchao.quantization import MappingType, PerGroup, PerRow, PerTensor

    rows, cols = weight.block_size[-2:]
    if (rows, cols) == tuple(weight.shape[-2:]):
        granularity = PerTensor()
    elif rows == 1 and cols == weight.shape[-1]:
        granularity = PerRow()
    else:
        granularity = PerGroup(cols)
    return type(weight).from_hp(
        dense,
        granularity=granularity,
        mapping_type=MappingType.SYMMETRIC if _symmetric(weight) else MappingType.ASYMMETRIC,
        act_quant_kwargs=weight.act_quant_kwargs,
        reduce_range=weight.reduce_range,
    )


def _torchao_intx(weight: Any, dense: torch.Tensor) -> Any:
    from torchao.quantization import MappingType

    return type(weight).from_hp(
        dense,
        tuple(weight.block_size),
        weight.target_dtype,
        mapping_type=MappingType.SYMMETRIC if _symmetric(weight) else MappingType.ASYMMETRIC,
        activation_quantization=weight.activation_quantization,
    )


# Requantizers by weight class name: each rebuilds a weight of the same class and settings.
_TORCHAO_REQUANTIZE: dict[str, Callable[[Any, torch.Tensor], Any]] = {
    "Int8Tensor": _torchao_int8,
    "IntxUnpackedToInt8Tensor": _torchao_intx,
}


def _torchao_blocker(module: nn.Module) -> str | None:
    name = type(module.weight).__name__
    if name in _TORCHAO_REQUANTIZE:
        return None
    return (
        f"requantizing a torchao {name} weight is not supported (supported: "
        f"{', '.join(sorted(_TORCHAO_REQUANTIZE))})"
    )


def _torchao_write(module: nn.Module, weight: torch.Tensor) -> None:
    old = module.weight
    requantized = _TORCHAO_REQUANTIZE[type(old).__name__](old, weight.to(old.dtype))
    module.weight = nn.Parameter(requantized, requires_grad=False)


def _keep_parameter(module: nn.Module) -> Any:
    return module.weight


def _put_parameter(module: nn.Module, saved: Any) -> None:
    module.weight = saved


def register_torchao() -> None:
    register_kind(
        BaseLayerKind(
            name="torchao-quantized nn.Linear",
            family="linear",
            matches=lambda module: (
                isinstance(module, nn.Linear) and _torchao_weight_class(module) is not None
            ),
            run_without_bias=_forward_without_bias,
            weight=lambda module: module.weight.dequantize(),
            write_weight=_torchao_write,
            save_weight=_keep_parameter,
            restore_weight=_put_parameter,
            # The tensor subclass reports the float dtype it computes in.
            dtype=lambda module: module.weight.dtype,
            device=_weight_device,
            merge_blocker=_torchao_blocker,
        ),
        before="torch.nn.Linear",
    )


# ---------------------------------------------------------------------------------------------
# HQQ: HQQLinear


def _hqq_write(module: nn.Module, weight: torch.Tensor) -> None:
    settings = copy.deepcopy(module.quant_config)
    # quantize() sets W_q as a plain tensor first: the registered parameter must go.
    del module.W_q
    module.quantize(
        weight,
        weight_quant_params=settings["weight_quant_params"],
        scale_quant_params=settings["scale_quant_params"],
        zero_quant_params=settings["zero_quant_params"],
    )


def _hqq_save(module: nn.Module) -> Any:
    # quantize() installs new W_q and meta objects; the old ones are kept as they are.
    return module.W_q, module.meta


def _hqq_restore(module: nn.Module, saved: Any) -> None:
    module.W_q, module.meta = saved


def register_hqq() -> None:
    register_kind(
        BaseLayerKind(
            name="HQQ HQQLinear",
            family="linear",
            matches=lambda module: _is_instance(module, "hqq.core.quantize", "HQQLinear"),
            run_without_bias=_forward_without_bias,
            weight=lambda module: module.dequantize(),
            write_weight=_hqq_write,
            save_weight=_hqq_save,
            restore_weight=_hqq_restore,
            dtype=lambda module: module.compute_dtype,
            device=lambda module: module.W_q.device,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Forward-only kinds: GPTQ, AWQ, AQLM, EETQ


def _class_in_mro(module: nn.Module, package: str, names: Callable[[str], bool]) -> bool:
    """Whether a class of ``module``'s hierarchy from ``package`` has a name that ``names`` accepts."""
    if package not in sys.modules:
        return False
    return any(
        cls.__module__.split(".")[0] == package and names(cls.__name__) for cls in type(module).__mro__
    )


def _forward_only_weight(module: nn.Module) -> torch.Tensor:
    raise TypeError(f"{type(module).__name__} layers cannot be dequantized; merging is not supported")


def _forward_only_write(module: nn.Module, weight: torch.Tensor) -> None:
    raise TypeError(f"{type(module).__name__} layers cannot be requantized; merging is not supported")


def _forward_only_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers())
    return tensor.device


def _forward_only_dtype(module: nn.Module) -> torch.dtype:
    bias = getattr(module, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else torch.float32


# (kind name, package, accepted class names) of each forward-only backend, as PEFT dispatches them.
_FORWARD_ONLY: tuple[tuple[str, str, Callable[[str], bool]], ...] = (
    ("GPTQ (gptqmodel)", "gptqmodel", lambda name: name == "BaseQuantLinear"),
    ("GPTQ (auto-gptq)", "auto_gptq", lambda name: name == "QuantLinear"),
    ("AWQ (autoawq)", "awq", lambda name: name.startswith("WQLinear")),
    ("AQLM", "aqlm", lambda name: name == "QuantizedLinear"),
    ("EETQ", "eetq", lambda name: name == "EetqLinear"),
)


def register_forward_only() -> None:
    for name, package, names in _FORWARD_ONLY:
        register_kind(
            BaseLayerKind(
                name=name,
                family="linear",
                matches=lambda module, package=package, names=names: _class_in_mro(module, package, names),
                features=_linear_features,
                run_without_bias=_forward_without_bias,
                weight=_forward_only_weight,
                write_weight=_forward_only_write,
                dtype=_forward_only_dtype,
                device=_forward_only_device,
                merge_blocker=lambda module, name=name: (
                    f"{name} layers support only the forward pass (no dequantization), as in PEFT"
                ),
            ),
            before="torch.nn.Linear",
        )


def register_quantized_kinds() -> None:
    """Registers every quantized kind once (the packages themselves are not imported)."""
    register_bitsandbytes()
    register_torchao()
    register_hqq()
    register_forward_only()
