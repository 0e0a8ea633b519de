"""``LinearLayer``: adapters on an ``nn.Linear`` or transformers ``Conv1D``, applied to the input.

Training never forms the dense ``in x in`` rotation nor a gradient for the frozen weight:
``x @ R`` runs through ``orthoft.ops.butterfly``, then the base layer's own linear map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import ops
from .base import OrthoftLayer
from .output_scale import scale_output


class LinearLayer(OrthoftLayer):
    """The linear family of ``OrthoftLayer``: ``y = (x @ R) @ W.T * s + bias``, for every base-layer kind
    of that family (``nn.Linear``, transformers' ``Conv1D``, ...; see ``kinds``).

    ``fan_in_fan_out`` (weight stored as ``(in, out)``) follows the kind: True for a ``Conv1D``
    whatever the argument says; True for an ``nn.Linear`` is an error.
    """

    family = "linear"
    fan_in_fan_out_error = (
        "does not fit an nn.Linear ({kind.name}), which stores its weight as (out_features, in_features); "
        "use fan_in_fan_out=False"
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        adapter_name: str = "default",
        layer_name: str | None = None,
        **options: Any,
    ) -> None:
        """As ``nn.Linear``, with a first adapter ``adapter_name`` of the method's keyword ``options``."""
        super().__init__(
            nn.Linear(in_features, out_features, bias, device, dtype),
            adapter_name=adapter_name,
            fan_in_fan_out=False,
            layer_name=layer_name,
            options=options,
        )

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
