"""Adapters on a raw parameter of a module (``target_parameters``), such as fused MoE expert weights.

transformers keeps the experts of a mixture-of-experts layer as 3-D parameters of one module (for
example ``Qwen3MoeExperts.gate_up_proj``, ``(experts, out, in)``), run by its own loop or grouped matmul.
``OFTParameter`` / ``BOFTParameter`` wrap that module and give each expert its own rotation of the
input features: its forward runs the module with ``W'_e = (W_e @ R_e^T) * s_e`` in place of the
parameter (``torch.func.functional_call``), so every expert computes ``W_e R_e x`` whatever the module's
forward does, and merging writes ``W'`` into the parameter. A 2-D parameter is one ``(out, in)`` weight.

Layout: a module with ``is_transposed = True`` (transformers' flag, gpt-oss) stores ``(experts, in, out)``;
otherwise ``(experts, out, in)``. Adapter tensors are a Linear layer's with the experts stacked along
the first block dimension: OFT ``oft_R.weight`` ``(E * r, b*(b-1)/2)``, BOFT ``boft_R`` ``(m, E * D, b, b)``
and ``boft_s`` ``(E * out, 1)``; a 2-D parameter has exactly a Linear layer's tensors.

Several parameters of one module nest, as PEFT's LoRA ``ParamWrapper`` does: the wrapper of the
parameter registered last is outermost, and each holds the next as its ``base_layer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import OrthoftLayer
from .boft import BOFTLayer
from .expert_rotation import rotate_expert_weights
from .kinds import BaseLayerKind
from .oft import OFTLayer
from .options import BOFTOptions, OFTOptions, with_options_signature

ADAPTABLE_DIMS = (2, 3)


def parameter_holder(module: nn.Module) -> nn.Module:
    """The module that holds the parameters, under any parameter adapters wrapped around it."""
    while isinstance(module, ParameterLayer):
        module = module.base_layer
    return module


def parameter_problem(parameter: torch.Tensor) -> str | None:
    """Why a parameter cannot be adapted, or ``None`` when it can."""
    if not parameter.dtype.is_floating_point:
        return f"its dtype is {parameter.dtype}, not a floating dtype"
    if parameter.dim() not in ADAPTABLE_DIMS:
        return f"it is {parameter.dim()}-D, not 2-D (out, in) or 3-D (experts, out, in)"
    return None


def is_transposed(holder: nn.Module, parameter: torch.Tensor) -> bool:
    """Whether a 3-D parameter is stored ``(experts, in, out)`` (transformers' ``is_transposed`` flag)."""
    return parameter.dim() == 3 and bool(getattr(holder, "is_transposed", False))


class ParameterLayer(OrthoftLayer):
    """The parameter family of ``OrthoftLayer``: one parameter of the module it wraps, rotated per expert."""

    family = "parameter"
    parameter_name: str
    transposed: bool

    @classmethod
    def from_parameter(
        cls,
        module: nn.Module,
        parameter_name: str,
        *,
        adapter_name: str = "default",
        layer_name: str | None = None,
        **options: Any,
    ) -> ParameterLayer:
        """Wraps ``module`` (or a parameter adapter around it) with a first adapter on its parameter
        ``parameter_name``. ``layer_name`` (the parameter's path in its model) only serves error messages."""
        layer = cls.__new__(cls)
        object.__setattr__(layer, "parameter_name", parameter_name)
        OrthoftLayer.__init__(
            layer,
            module,
            adapter_name=adapter_name,
            fan_in_fan_out=False,
            layer_name=layer_name,
            options=options,
        )
        return layer

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> ParameterLayer:  # type: ignore[override]
        raise TypeError(f"{cls.__name__} adapts one parameter of a module: use {cls.__name__}.from_parameter")

    @property
    def holder(self) -> nn.Module:
        return parameter_holder(self.base_layer)

    def _parameter(self) -> torch.Tensor:
        return self.holder._parameters[self.parameter_name]  # type: ignore[return-value]

    def _attach_base_layer(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        holder = parameter_holder(base_layer)
        parameter = holder._parameters.get(self.parameter_name)
        if parameter is None:
            names = list(holder._parameters)
            raise ValueError(
                f"{self.label}: {type(holder).__name__} has no parameter {self.parameter_name!r}; "
                f"it has {names}"
            )
        problem = parameter_problem(parameter)
        if problem is not None:
            raise ValueError(
                f"{self.label}: parameter {self.parameter_name!r} of shape {tuple(parameter.shape)} "
                f"cannot be adapted: {problem}"
            )
        self.base_layer = base_layer
        self.transposed = is_transposed(holder, parameter)
        shape = tuple(parameter.shape)
        if len(shape) == 2:
            self.num_experts, (self.out_features, self.in_features) = 1, shape
        elif self.transposed:
            self.num_experts, self.in_features, self.out_features = shape
        else:
            self.num_experts, self.out_features, self.in_features = shape
        self.fan_in_fan_out = False
        self.filter_size = self.in_features
        self.base_kind = self._parameter_kind()

    def _parameter_kind(self) -> BaseLayerKind:
        """How the merge reads and writes the parameter (the base class merges through a kind, passing
        ``base_layer``). It holds only the name, so that a deep copy of the layer reads its own module."""
        name = self.parameter_name

        def read(module: nn.Module) -> torch.Tensor:
            return parameter_holder(module)._parameters[name]  # type: ignore[return-value]

        def write(module: nn.Module, value: torch.Tensor) -> None:
            read(module).copy_(value)

        return BaseLayerKind(
            name=f"parameter {name!r}",
            family=self.family,
            matches=lambda module: False,
            weight=read,
            write_weight=write,
            save_weight=lambda module: read(module).detach().clone(),
            restore_weight=write,
            dtype=lambda module: read(module).dtype,
            device=lambda module: read(module).device,
        )

    def _filter_text(self) -> str:
        return f"the parameter's in_features={self.in_features}"

    def _dims_repr(self) -> str:
        layout = "(experts, in, out)" if self.transposed else "(experts, out, in)"
        return (
            f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, "
            f"in_features={self.in_features}, out_features={self.out_features}, layout={layout}"
        )

    @property
    def weight(self) -> torch.Tensor:
        return self._parameter()

    @property
    def bias(self) -> torch.Tensor | None:
        return None

    # The merge path works on the canonical (E, out, in) form of the parameter.
    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 2:
            return weight.unsqueeze(0)
        return weight.transpose(1, 2) if self.transposed else weight

    def _weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        if self._parameter().dim() == 2:
            return matrix.squeeze(0)
        return matrix.transpose(1, 2) if self.transposed else matrix

    def _apply_adapter(self, matrix: torch.Tensor, adapter_name: str, training: bool) -> torch.Tensor:
        rotations, block_size = self._rotation_factors(adapter_name, training)
        return rotate_expert_weights(matrix, rotations, block_size, self._output_scale(adapter_name))

    def get_rotation(self, adapter_name: str | None = None) -> torch.Tensor:
        """The dense rotations ``(E, in, in)`` of one adapter (default: the active ones composed)."""
        eye = torch.eye(self.in_features, dtype=self._adapter_dtype(), device=self._base_device())
        rotation = eye.expand(self.num_experts, -1, -1)
        for name in self._selected(adapter_name):
            rotations, block_size = self._rotation_factors(name, training=False)
            # Rows of W' = W R^T for W = I are R^T: the experts' R from rotating the identity.
            rotated = rotate_expert_weights(eye.expand(self.num_experts, -1, -1), rotations, block_size)
            rotation = rotated.mT @ rotation.to(rotated.dtype)
        return rotation.contiguous()

    # Forward: the holder runs with every adapted parameter of the chain replaced by its rotated form.
    def _adapted_parameter(self) -> torch.Tensor | None:
        """The parameter with the active adapters applied, or ``None`` where it runs as it is."""
        if self._adapters_disabled and self.merged:
            self.unmerge()
        active = self._held(self.active_adapters)
        if self._adapters_disabled or self.merged or not active:
            return None
        if any(p.is_meta for name in active for p in self._adapter_parameters(name)):
            raise ValueError(
                f"{self.label}: adapter {active[0]!r} was created with low_cpu_mem_usage=True and holds no "
                "values yet; load them first (orthoft.load_adapter or load_adapter_state_dict)"
            )
        parameter = self._parameter()
        weight = parameter.unsqueeze(0) if parameter.dim() == 2 else parameter
        for name in active:
            rotations, block_size = self._rotation_factors(name, self.training)
            weight = rotate_expert_weights(
                weight, rotations, block_size, self._output_scale(name), transposed=self.transposed
            )
        return weight.squeeze(0) if parameter.dim() == 2 else weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        replaced: dict[str, torch.Tensor] = {}
        module: nn.Module = self
        while isinstance(module, ParameterLayer):
            adapted = module._adapted_parameter()
            if adapted is not None:
                replaced[module.parameter_name] = adapted
            module = module.base_layer
        if not replaced:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, replaced, args, kwargs, strict=False)


class OFTParameter(OFTLayer, ParameterLayer):
    """OFT on a raw 2-D or 3-D parameter: ``r`` Cayley blocks of size ``b`` per expert."""


class BOFTParameter(BOFTLayer, ParameterLayer):
    """BOFT on a raw 2-D or 3-D parameter: ``m`` butterfly factors and an output scale per expert."""

    def _scale_shape(self) -> tuple[int, int]:
        return (self.num_experts * self.out_features, 1)


PARAMETER_LAYER_CLASSES: dict[str, type[ParameterLayer]] = {"OFT": OFTParameter, "BOFT": BOFTParameter}

OFTParameter.from_parameter = classmethod(  # type: ignore[method-assign]
    with_options_signature(ParameterLayer.from_parameter.__func__, OFTOptions)  # type: ignore[attr-defined]
)
BOFTParameter.from_parameter = classmethod(  # type: ignore[method-assign]
    with_options_signature(ParameterLayer.from_parameter.__func__, BOFTOptions)  # type: ignore[attr-defined]
)
