"""Rotating the input features of stacked expert weights, one rotation per expert, in one operator call.

An expert weight ``W_e`` (out x in) becomes ``W'_e = (W_e @ R_e^T) * s_e``. Laid side by side as one
``(out, E * in)`` matrix, the experts' rotations are one block-diagonal rotation of ``E * in`` columns:
BOFT's permutations stay inside chunks of ``C = b * 2^(m-1)`` columns, which never cross an expert, so
stacking the experts' blocks along the block dimension (``(m, E * D, b, b)``) gives exactly the
per-expert rotations, and ``orthoft.ops.butterfly`` runs them all at once.

``rotate_expert_weights`` keeps only the frozen weight (no copy of it) and the small chunks for
backward, and the result for BOFT's scale: the rotated weight is what the experts' own forward keeps.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .rotation import rotation_chunks


def _side_by_side(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The experts of ``weight`` as one ``(out, E * in)`` matrix: ``(E, out, in)``, or ``(E, in, out)``
    when ``transposed`` (then a view, without a copy)."""
    experts, rows, cols = weight.shape
    if transposed:
        return weight.reshape(experts * rows, cols).mT
    return weight.transpose(0, 1).reshape(rows, experts * cols)


def _stacked(matrix: torch.Tensor, experts: int, transposed: bool) -> torch.Tensor:
    """``_side_by_side`` undone: an ``(out, E * in)`` matrix as a contiguous weight in the layout."""
    out, width = matrix.shape
    stacked = matrix.view(out, experts, width // experts)
    return (stacked.permute(1, 2, 0) if transposed else stacked.transpose(0, 1)).contiguous()


def _scale_view(scale: torch.Tensor, experts: int, transposed: bool) -> torch.Tensor:
    """A per-expert, per-output scale ``(E * out,)`` shaped to broadcast over the weight's layout."""
    return scale.view(experts, 1, -1) if transposed else scale.view(experts, -1, 1)


class _RotateExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        weight: torch.Tensor, chunks_t: torch.Tensor, scale: torch.Tensor | None, transposed: bool
    ) -> torch.Tensor:
        matrix = _side_by_side(weight, transposed)
        rotated = _stacked(ops.butterfly(matrix, chunks_t, chunks_t.shape[-1]), weight.shape[0], transposed)
        return rotated if scale is None else rotated * _scale_view(scale, weight.shape[0], transposed)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        weight, chunks_t, scale, transposed = inputs
        ctx.transposed = transposed
        ctx.has_scale = scale is not None
        ctx.save_for_backward(weight, chunks_t, *((scale, output) if scale is not None else ()))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, chunks_t, *scaled = ctx.saved_tensors
        experts, transposed = weight.shape[0], ctx.transposed
        grad_scale = None
        if scaled:
            scale, output = scaled
            view = _scale_view(scale, experts, transposed)
            if ctx.needs_input_grad[2]:
                # d/ds of (rotated * s) is rotated = output / s: the kept output, no rotated copy kept.
                summed = (grad * output).sum(1 if transposed else 2)
                grad_scale = summed.reshape(-1) / scale
            grad = grad * view
        need_weight, need_chunks = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_weight or need_chunks):
            return None, None, grad_scale, None
        grad_weight, grad_chunks = torch.ops.orthoft.butterfly_backward.default(
            _side_by_side(grad, transposed),
            _side_by_side(weight, transposed),
            chunks_t,
            chunks_t.shape[-1],
            [need_weight, need_chunks],
        )
        grad_weight = _stacked(grad_weight, experts, transposed) if need_weight else None
        return grad_weight, (grad_chunks if need_chunks else None), grad_scale, None


def rotate_expert_weights(
    weight: torch.Tensor,
    rotations: torch.Tensor,
    block_size: int,
    scale: torch.Tensor | None = None,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """``W'_e = (W_e @ R_e^T) * s_e`` for every expert of ``weight``, as a new contiguous tensor.

    ``weight``: ``(E, out, in)``, or ``(E, in, out)`` with ``transposed`` (then ``W'_e = s_e * R_e W_e``
    in that layout). ``rotations``: butterfly factors ``(m, E * D, b, b)``, expert ``e``'s blocks at
    ``e * D .. (e + 1) * D - 1``. ``scale``: ``(E * out,)`` or ``None``. Differentiable in all three.
    """
    chunks = rotation_chunks(rotations.to(weight.dtype), block_size)
    scale = None if scale is None else scale.to(weight.dtype)
    return _RotateExperts.apply(weight, chunks.mT.unsqueeze(0), scale, transposed)
