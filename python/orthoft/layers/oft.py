"""OFT layers: a block-diagonal rotation of ``r`` Cayley blocks of size ``b`` (``r * b = F``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import OrthoftLayer, compute_dtype
from .conv import Conv2dLayer
from .linear import LinearLayer
from .options import OFTOptions, with_options_signature
from .rotation import cayley_blocks, drop_blocks, packed_skew, project_packed_skew


class OFTRotation(nn.Module):
    """One OFT adapter's tensor: ``weight`` ``(r, b*(b-1)/2)``, the strict upper triangles of the
    skew blocks (``(1, ...)`` with block sharing), laid out as PEFT's ``OFTRotationModule``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class OFTLayer(OrthoftLayer):
    """The OFT method: ``R = blockdiag(R_1 .. R_r)``, each ``R_j`` the Cayley transform of a skew block."""

    adapter_parameter_names = ("oft_R",)
    options_class = OFTOptions
    oft_R: nn.ModuleDict
    adapter_options: dict[str, OFTOptions]  # type: ignore[assignment]

    def _init_adapter_containers(self) -> None:
        self.oft_R = nn.ModuleDict()

    def _create_adapter_tensors(self, adapter_name: str, options: OFTOptions) -> None:
        b = options.block_size
        weight = torch.zeros(
            1 if options.block_share else options.r,
            b * (b - 1) // 2,
            dtype=self._adapter_dtype(),
            device=self._base_device(),
        )
        if not options.init_weights:
            nn.init.normal_(weight, mean=0.0, std=0.1)
        self.oft_R[adapter_name] = OFTRotation(weight)

    def _rotation_factors(self, adapter_name: str, training: bool) -> tuple[torch.Tensor, int]:
        options = self.adapter_options[adapter_name]
        weight = self.oft_R[adapter_name].weight
        if options.coft:
            # As PEFT: the parameter itself is projected before each use.
            with torch.no_grad():
                weight.copy_(project_packed_skew(weight, options.eps))
        b = options.block_size
        skew = packed_skew(weight.to(compute_dtype(weight.dtype)), b)
        terms = options.num_cayley_neumann_terms if options.use_cayley_neumann else 0
        # A shared block is transformed once and repeated over the r blocks.
        rotations = cayley_blocks(skew, terms).expand(options.r, b, b).unsqueeze(0)
        if training and options.dropout > 0:
            rotations = drop_blocks(rotations, options.dropout)
        return rotations, b

    def _output_scale(self, adapter_name: str) -> torch.Tensor | None:
        return None


class OFTLinear(OFTLayer, LinearLayer):
    """``nn.Linear`` with an OFT adapter: ``y = base(x @ R)``, ``x @ R`` by the butterfly operator."""

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
        super().__init__(
            nn.Linear(in_features, out_features, bias, device, dtype),
            adapter_name=adapter_name,
            fan_in_fan_out=False,
            layer_name=layer_name,
            options=options,
        )


class OFTConv2d(OFTLayer, Conv2dLayer):
    """``nn.Conv2d`` with an OFT adapter on its flattened filters: ``W' = W_flat @ R^T``, exact."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        adapter_name: str = "default",
        layer_name: str | None = None,
        **options: Any,
    ) -> None:
        base_layer = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        super().__init__(
            base_layer,
            adapter_name=adapter_name,
            fan_in_fan_out=False,
            layer_name=layer_name,
            options=options,
        )


# The keyword options show up typed in the signatures (help, editors), from the one declaration.
OFTLayer.add_adapter = with_options_signature(OFTLayer.add_adapter, OFTOptions)  # type: ignore[method-assign]
OFTLinear.__init__ = with_options_signature(OFTLinear.__init__, OFTOptions)  # type: ignore[method-assign]
OFTConv2d.__init__ = with_options_signature(OFTConv2d.__init__, OFTOptions)  # type: ignore[method-assign]
