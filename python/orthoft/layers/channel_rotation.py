"""A 1x1 convolution with a frozen weight whose input channels are rotated first.

For a 1x1 kernel the flattened filter is the input channels of one group, so
``conv(x, W R^T) = conv(x R, W)`` with ``x R`` acting on each group's channels at every pixel. Padding
(of any mode), stride and dilation act on pixels only and commute with it. Rotating the input needs
no gradient of the convolution's weight: the backward costs the frozen convolution's own input
gradient plus two products with the dense chunks of ``R``, instead of a weight-gradient convolution.
Both run in one ``channel_blocks`` backward, on the NCHW layout as it is.
Forward convolves ``x`` with the rotated weight, which costs less than rotating ``x``.

Backward takes the gradient of ``x R`` from a convolution with the unrotated weight: it needs only
the input's shape, which ``x`` has too.
"""

from __future__ import annotations

from typing import Any

import torch

from .output_scale import scale_gradient
from .rotation import times_chunks_transposed


def _positions(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` ``(N, groups * F, H, W)`` as ``(N * groups, F, H * W)``: each group's channels at every pixel."""
    return x.reshape(x.shape[0] * groups, x.shape[1] // groups, -1)


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
        # conv(x R, W) = conv(x, W R^T): rotating the weight costs out / (N H W) of rotating x.
        rotated = _rotate_filters(_scaled(weight, scale), chunks)
        return torch.nn.functional.conv2d(x, rotated, bias, stride, padding, dilation, groups)

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
        grad_x, grad_chunks = torch.ops.orthoft.channel_blocks_backward.default(
            _positions(grad_rotated, groups), _positions(x, groups), chunks, [need_x, need_chunks]
        )
        grad_scale = None
        if need_scale:
            output, bias = kept
            grad_scale = scale_gradient(grad, output, scale, bias, channel_dim=1)
        return (
            grad_x.reshape(x.shape) if need_x else None,
            grad_chunks if need_chunks else None,
            None,
            grad_scale,
            grad_bias if need_bias else None,
            None,
        )


def _rotate_filters(weight: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    """``W R^T`` for a 1x1 ``weight`` ``(out, F, 1, 1)``, ``R = blockdiag(chunks)`` ``(F/C, C, C)``."""
    return times_chunks_transposed(weight.reshape(weight.shape[0], -1), chunks).reshape(weight.shape)


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
    """``conv2d(x R, weight * scale, bias, *conv)``, ``weight`` 1x1, frozen, where ``x R`` multiplies each
    pixel's channels of each group, as a row vector, by ``R = blockdiag(chunks)``.

    ``conv`` is ``(stride, padding, dilation, groups)`` with a numeric padding (the caller pads other
    modes first); ``scale`` ``(out,)`` multiplies the weight's rows (BOFT), or is ``None``.
    """
    return _RotatedInputConv.apply(x, chunks, weight, scale, bias, conv)
