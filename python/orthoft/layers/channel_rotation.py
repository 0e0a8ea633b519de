"""A 1x1 convolution with a frozen weight whose input channels are rotated first.

For a 1x1 kernel the flattened filter is the input channels of one group, so
``conv(x, W R^T) = conv(x R, W)`` with ``x R`` acting on each group's channels at every pixel. Padding
(of any mode), stride and dilation act on pixels only and commute with it. Rotating the input needs
no gradient of the convolution's weight: the backward costs the frozen convolution's own input
gradient plus three products with the dense chunks of ``R``, instead of a weight-gradient convolution.

The rotated input is not kept for backward: the input gradient of a convolution only needs the
input's shape, which the unrotated input has too.
"""

from __future__ import annotations

from typing import Any

import torch

from .output_scale import scale_gradient


def _channel_blocks(x: torch.Tensor, groups: int, chunks: torch.Tensor) -> torch.Tensor:
    """``x`` ``(N, groups * F, H, W)`` as ``(N, groups, F/C, C, H*W)`` for chunks ``(F/C, C, C)``."""
    n, c = chunks.shape[:2]
    return x.reshape(x.shape[0], groups, n, c, -1)


def rotate_channels(x: torch.Tensor, chunks: torch.Tensor, groups: int) -> torch.Tensor:
    """Each pixel's channels of each group times ``R = blockdiag(chunks)``, as a row vector."""
    return torch.matmul(chunks.mT, _channel_blocks(x, groups, chunks)).reshape(x.shape)


class _RotatedInputConv(torch.autograd.Function):
    @staticmethod
    def forward(
        x: torch.Tensor,
        chunks: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        conv: tuple[tuple[int, int], tuple[int, int], tuple[int, int], int],
    ) -> torch.Tensor:
        stride, padding, dilation, groups = conv
        rotated = rotate_channels(x, chunks, groups)
        weight = _scaled(weight, scale)
        return torch.nn.functional.conv2d(rotated, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, chunks, weight, scale, bias, conv = inputs
        ctx.conv = conv
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        # The scale's gradient reads the output, which the model's next operation holds anyway. The
        # weight is kept unscaled (the parameter itself) and scaled again in backward.
        kept = (output, bias) if ctx.needs_input_grad[3] else ()
        ctx.save_for_backward(x, chunks, weight, scale, *kept)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, chunks, weight, scale, *kept = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_chunks, _, need_scale, need_bias = ctx.needs_input_grad[:5]
        # x stands in for the rotated input, of the same shape: only its shape is read.
        grad_rotated, _, grad_bias = torch.ops.aten.convolution_backward(
            grad,
            x,
            _scaled(weight, scale),
            ctx.bias_sizes,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            [True, False, need_bias],
        )
        grad_x = grad_chunks = grad_scale = None
        grad_blocks = _channel_blocks(grad_rotated, groups, chunks)
        if need_x:
            grad_x = torch.matmul(chunks, grad_blocks).reshape(x.shape)
        if need_chunks:
            grad_chunks = torch.matmul(_channel_blocks(x, groups, chunks), grad_blocks.mT).sum((0, 1))
        if need_scale:
            output, bias = kept
            grad_scale = scale_gradient(grad, output, scale, bias, channel_dim=1)
        return grad_x, grad_chunks, None, grad_scale, (grad_bias if need_bias else None), None


def _scaled(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return weight if scale is None else weight * scale.reshape(-1, 1, 1, 1)


def rotated_input_conv(
    x: torch.Tensor,
    chunks: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    conv: tuple[tuple[int, int], tuple[int, int], tuple[int, int], int],
) -> torch.Tensor:
    """``conv2d(rotate_channels(x, chunks, groups), weight * scale, bias, *conv)``, ``weight`` 1x1, frozen.

    ``conv`` is ``(stride, padding, dilation, groups)`` with a numeric padding (the caller pads other
    modes first); ``scale`` ``(out,)`` multiplies the weight's rows (BOFT), or is ``None``.
    """
    return _RotatedInputConv.apply(x, chunks, weight, scale, bias, conv)
