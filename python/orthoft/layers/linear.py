"""``LinearLayer``: adapters on an ``nn.Linear`` or transformers ``Conv1D``, applied to the input.

Training never forms the dense ``in x in`` rotation nor a gradient for the frozen weight:
``x @ R`` runs through ``orthoft.ops.butterfly``, then the base layer's own linear map.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .base import OrthoftLayer


def _transformers_conv1d() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class if transformers is loaded (a module of that type implies it is)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


class LinearLayer(OrthoftLayer):
    """The Linear kind of ``OrthoftLayer``: ``y = (x @ R) @ W.T * s + bias``.

    ``fan_in_fan_out`` is True for a transformers ``Conv1D`` (weight stored as ``(in, out)``),
    whatever the argument says, and must be False for an ``nn.Linear``.
    """

    fan_in_fan_out: bool

    def _attach_base_layer(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        conv1d = _transformers_conv1d()
        if isinstance(base_layer, nn.Linear):
            if fan_in_fan_out:
                raise ValueError(
                    f"{self.label}: fan_in_fan_out=True does not fit an nn.Linear, which stores its weight "
                    "as (out_features, in_features); use fan_in_fan_out=False"
                )
            in_features, out_features = base_layer.in_features, base_layer.out_features
        elif conv1d is not None and isinstance(base_layer, conv1d):
            fan_in_fan_out = True
            in_features, out_features = base_layer.weight.shape
        else:
            raise TypeError(
                f"{self.label} cannot wrap a {type(base_layer).__module__}.{type(base_layer).__qualname__}; "
                "supported base layers: torch.nn.Linear and transformers' Conv1D"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features = in_features
        self.out_features = out_features
        self.filter_size = in_features

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
        weight = self.base_layer.weight
        out = rotated @ weight if self.fan_in_fan_out else F.linear(rotated, weight)
        out = out * scale.to(out.dtype)
        bias = self.base_layer.bias
        return out if bias is None else out + bias
