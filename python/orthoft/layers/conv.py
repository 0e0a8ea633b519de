"""``Conv2dLayer``: adapters on an ``nn.Conv2d``, exact by construction.

The rotation acts on the flattened filter ``F = (in/groups) * kh * kw``: ``W' = (W_flat @ R^T) * s``
reshaped back, then the base layer's own convolution with all its stride, padding, padding mode,
dilation and groups. With ``R = I`` the output is the base layer's; merged equals unmerged.

For a 1x1 kernel ``F`` is a group's input channels, and where it costs less the rotation acts on them
instead (``channel_rotation``): the same function without a gradient of the weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import OrthoftLayer
from .channel_rotation import rotated_input_conv
from .rotation import rotation_chunks


def _base_attribute(name: str) -> property:
    return property(lambda self: getattr(self.base_layer, name), doc=f"The base layer's ``{name}``.")


class Conv2dLayer(OrthoftLayer):
    """The Conv2d kind of ``OrthoftLayer``.

    ``in_features``/``out_features`` repeat ``in_channels``/``out_channels``, as PEFT names them; the
    other ``nn.Conv2d`` attributes (``kernel_size``, ``stride``, ``padding``, ``groups``, ...) read
    through to the base layer.
    """

    family = "conv2d"
    fan_in_fan_out_error = "applies to Conv1D layers only, not nn.Conv2d"

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
        """As ``nn.Conv2d``, with a first adapter ``adapter_name`` of the method's keyword ``options``."""
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

    def _rotation_size(self) -> int:
        kh, kw = self.base_layer.kernel_size
        return self.base_layer.in_channels // self.base_layer.groups * kh * kw

    def _filter_text(self) -> str:
        kh, kw = self.kernel_size
        groups = self.base_layer.groups
        return (
            f"the filter size (in_channels/groups)*kh*kw = ({self.in_channels}/{groups})*{kh}*{kw} "
            f"= {self.filter_size}"
        )

    def _dims_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, filter_size={self.filter_size}"
        )

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.out_channels, self.filter_size)

    def _weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.weight.shape)

    def _adapted_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        if self._rotates_input(adapter_names):
            return self._input_rotated_forward(x, adapter_names[0])
        weight = self.weight
        matrix = self._adapted_weight_matrix(weight, adapter_names, self.training)
        adapted = self._weight_from_matrix(matrix).to(weight.dtype)
        return self.base_layer._conv_forward(x, adapted, self.base_layer.bias)

    def _rotates_input(self, adapter_names: list[str]) -> bool:
        """Whether forward rotates the input channels rather than the weight.

        Only for a 1x1 kernel, one adapter and a frozen weight. Per pixel, the rotated input costs two
        products with the dense chunks of ``R`` in backward (``2 * C * in`` multiply-adds, by the
        ``channel_blocks`` operator), the rotated weight one weight-gradient product (``out * in / groups``).
        In a training step the chunks' products run at about half the convolution's speed per
        multiply-add, hence ``4 * C``: at ``out = 4 * C`` the rotated input was as fast or faster (batch 8,
        1024->256 at 14x14, ``C = 64``: 7.26 ms against 7.99; 1024->128, ``C = 32``: 4.43 against 4.52), at
        ``out = 2 * C`` slower (256->64 at 56x56, ``C = 32``: 13.58 against 12.82).
        """
        base = self.base_layer
        if base.kernel_size != (1, 1) or len(adapter_names) != 1:
            return False
        if base.weight.requires_grad and torch.is_grad_enabled():
            return False
        return 4 * self._rotation_chunk_size(adapter_names[0]) * base.groups <= base.out_channels

    def _input_rotated_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if x.dim() == 3:  # an unbatched input, as nn.Conv2d takes it
            return self._input_rotated_forward(x.unsqueeze(0), adapter_name).squeeze(0)
        base = self.base_layer
        rotations, block_size = self._rotation_factors(adapter_name, self.training)
        chunks = rotation_chunks(rotations, block_size).to(x.dtype)
        padding = base.padding
        if base.padding_mode != "zeros":
            x = nn.functional.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = (0, 0)
        elif isinstance(padding, str):  # "same" and "valid" are no padding for a 1x1 kernel
            padding = (0, 0)
        scale = self._output_scale(adapter_name)
        scale = None if scale is None else scale.to(x.dtype)
        conv = (base.stride, padding, base.dilation, base.groups)
        return rotated_input_conv(x, chunks, base.weight, scale, base.bias, conv)


# nn.Conv2d's attributes, read from the base layer so that the layer stands in for it.
for _name in (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
    "output_padding",
    "transposed",
):
    setattr(Conv2dLayer, _name, _base_attribute(_name))
