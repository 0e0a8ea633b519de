"""``LinearLayer``: adapters on an ``nn.Linear`` or transformers ``Conv1D``, applied to the input.

Training never forms the dense ``in x in`` rotation nor a gradient for the frozen weight:
``x @ R`` runs through ``orthoft.ops.butterfly``, then the base layer's own linear map.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import OrthoftLayer
from .kinds import kind_of, supported_kinds
from .output_scale import scale_output


class LinearLayer(OrthoftLayer):
    """The linear family of ``OrthoftLayer``: ``y = (x @ R) @ W.T * s + bias``, for every base-layer kind
    of that family (``nn.Linear``, transformers' ``Conv1D``, ...; see ``kinds``).

    ``fan_in_fan_out`` (weight stored as ``(in, out)``) follows the kind: True for a ``Conv1D``
    whatever the argument says; True for an ``nn.Linear`` is an error.
    """

    family = "linear"
    fan_in_fan_out: bool

    def _attach_base_layer(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        kind = kind_of(base_layer)
        if kind is None or kind.family != self.family:
            raise TypeError(
                f"{self.label} cannot wrap a {type(base_layer).__module__}.{type(base_layer).__qualname__}; "
                f"supported base layers: {supported_kinds(self.family)}"
            )
        if fan_in_fan_out and not kind.fan_in_fan_out:
            raise ValueError(
                f"{self.label}: fan_in_fan_out=True does not fit an nn.Linear ({kind.name}), which stores "
                "its weight as (out_features, in_features); use fan_in_fan_out=False"
            )
        self.base_layer = base_layer
        self.base_kind = kind
        self.fan_in_fan_out = kind.fan_in_fan_out
        self.in_features, self.out_features = kind.features(base_layer)
        self.filter_size = self.in_features

    def _filter_text(self) -> str:
        return f"in_features={self.in_features}"

    def _dims_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.mT if self.fan_in_fan_out else weight

    def _weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.mT if self.fan_in_fan_out else matrix

    def _adapted_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        # x @ R_last @ ... @ R_first: the last adapter acts on the input first.
        rotated = x
        scale: torch.Tensor | None = None
        for name in reversed(adapter_names):
            rotations, block_size = self._rotation_factors(name, self.training)
            rotated = ops.butterfly(rotated, rotations.to(x.dtype), block_size)
            adapter_scale = self._output_scale(name)
            if adapter_scale is not None:
                scale = adapter_scale if scale is None else scale * adapter_scale
        if scale is None:
            return self.base_layer(rotated)
        # The scale multiplies W's rows only, not the bias.
        run_without_bias = self.base_kind.run_without_bias
        if run_without_bias is None:
            raise TypeError(
                f"{self.label}: BOFT's output scale needs a {self.base_kind.name} without its bias"
            )
        out = run_without_bias(self.base_layer, rotated)
        return scale_output(out, scale.to(out.dtype), self.base_layer.bias)
