"""BOFT's per-output scale on a linear layer's output: ``y = out * s + bias``.

Autograd of the plain expression keeps ``out`` (an output-sized tensor) alive for the gradient of
``s``. This function keeps ``y`` instead, which the next operation of the model holds anyway, and
recovers ``out = (y - bias) / s`` in backward. ``s`` starts at 1 and trains slowly; a scale of exactly
zero would lose ``out`` and is not supported.
"""

from __future__ import annotations

from typing import Any

import torch


class _ScaleOutput(torch.autograd.Function):
    @staticmethod
    def forward(out: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return out * scale if bias is None else torch.addcmul(bias, out, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, scale, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(output, scale, *((bias,) if bias is not None else ()))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, scale, *bias = ctx.saved_tensors
        grad_out = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_scale = scale_gradient(grad, y, scale, bias[0] if bias else None, channel_dim=-1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_out, grad_scale, grad_bias


def scale_gradient(
    grad: torch.Tensor, output: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, channel_dim: int
) -> torch.Tensor:
    """The gradient of ``s`` in ``y = out * s + bias`` (``s`` and ``bias`` along ``channel_dim``) from ``y``:
    ``sum(grad * out)`` over every other dimension, with ``out = (y - bias) / s`` divided after the sum."""
    dim = channel_dim % grad.dim()
    along_channels = [-1 if d == dim else 1 for d in range(grad.dim())]
    unbiased = output if bias is None else output - bias.reshape(along_channels)
    others = [d for d in range(grad.dim()) if d != dim]
    product = grad * unbiased
    # An empty dimension list would sum over everything.
    return (product.sum(others) if others else product) / scale


def scale_output(out: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out * scale + bias`` over the last dimension, keeping only the result for backward."""
    return _ScaleOutput.apply(out, scale, bias)
