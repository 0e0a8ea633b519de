"""OFT on a k x k convolution by rotating the unfolded input: the alternative to a rotated weight.

``conv(x, W R^T)`` is ``W (R^T unfold(x))`` at every position, so the backward can take one product
``H = W^T G`` for both gradients: x's is ``fold(R H)`` and the blocks' is the sum over positions of
``unfold(x) H^T``, block by block (``channel_blocks_backward``). That trades the rotated weight's
weight-gradient convolution for ``H``, an unfold, a fold and two block products on the unfolded input,
``in * kh * kw`` rows per position. The conv suite measures it beside ``OFTConv2d``, which rotates the
weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional

from orthoft.layers import OFTConv2d
from orthoft.layers.rotation import rotation_chunks, times_chunks_transposed


class _UnfoldedInputConv(torch.autograd.Function):
    @staticmethod
    def forward(
        x: torch.Tensor,
        chunks: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv: nn.Conv2d,
    ) -> torch.Tensor:
        out_channels = weight.shape[0]
        rotated = times_chunks_transposed(weight.reshape(out_channels, -1), chunks).reshape(weight.shape)
        return functional.conv2d(x, rotated, bias, conv.stride, conv.padding, conv.dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, chunks, weight, _, conv = inputs
        ctx.conv = conv
        ctx.save_for_backward(x, chunks, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, chunks, weight = ctx.saved_tensors
        conv = ctx.conv
        # H = W^T G at every output position: a 1x1 convolution with in * kh * kw output channels.
        transposed = weight.reshape(weight.shape[0], -1).t().reshape(-1, weight.shape[0], 1, 1)
        h = functional.conv2d(grad, transposed).flatten(2)
        unfolded = functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        grad_unfolded, grad_chunks = torch.ops.orthoft.channel_blocks_backward.default(
            h, unfolded, chunks, [True, True]
        )
        grad_x = functional.fold(
            grad_unfolded, x.shape[-2:], conv.kernel_size, conv.dilation, conv.padding, conv.stride
        )
        grad_bias = grad.sum((0, 2, 3)) if ctx.needs_input_grad[3] else None
        return grad_x, grad_chunks, None, grad_bias, None


class UnfoldedInputOFTConv2d(nn.Module):
    """``layer``'s function, with its rotation applied to the unfolded input in backward."""

    def __init__(self, layer: OFTConv2d) -> None:
        super().__init__()
        base = layer.base_layer
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError(
                "UnfoldedInputOFTConv2d takes groups=1 and a numeric zero padding, not "
                f"groups={base.groups}, padding={base.padding!r}, padding_mode={base.padding_mode!r}"
            )
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotations, block_size = self.layer._rotation_factors(self.layer.active_adapters[0], self.training)
        chunks = rotation_chunks(rotations, block_size).to(x.dtype)
        base = self.layer.base_layer
        return _UnfoldedInputConv.apply(x, chunks, base.weight, base.bias, base)
