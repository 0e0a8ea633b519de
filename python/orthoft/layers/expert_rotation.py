"""Rotating the input features of stacked expert weights, one rotation per expert, in one operator call.

An expert weight ``W_e`` (out x in) becomes ``W'_e = (W_e @ R_e^T) * s_e``. Laid side by side as one
``(out, E * in)`` matrix, the experts' rotations are one block-diagonal rotation of ``E * in`` columns:
BOFT's permutations stay inside chunks of ``C = b * 2^(m-1)`` columns, which never cross an expert, so
stacking the experts' blocks along the block dimension (``(m, E * D, b, b)``) gives exactly the
per-expert rotations, and ``orthoft.ops.butterfly`` runs them all at once.

``rotate_expert_weights`` keeps only the frozen weight (no copy of it) and the small chunks for
backward, and the result for BOFT's scale: the rotated weight is what the experts' own forward keeps.
It works through the experts in a few groups, so that its side-by-side copies stay a fraction of the
weight.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .rotation import rotation_chunks

# Experts are rotated in about this many groups: the side-by-side copies of a group then cost an eighth
# of the weight, not two weights, for as many operator calls.
GROUPS = 8


def _groups(experts: int) -> list[slice]:
    size = -(-experts // GROUPS)
    return [slice(start, min(start + size, experts)) for start in range(0, experts, size)]


def _side_by_side(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The experts of ``weight`` as one ``(out, E * in)`` matrix: ``(E, out, in)``, or ``(E, in, out)``
    when ``transposed`` (then a view, without a copy)."""
    experts, rows, cols = weight.shape
    if transposed:
        return weight.reshape(experts * rows, cols).mT
    return weight.transpose(0, 1).reshape(rows, experts * cols)


def _stacked(matrix: torch.Tensor, experts: int, transposed: bool) -> torch.Tensor:
    """``_side_by_side`` undone, as a view: an ``(out, E * in)`` matrix in the weight's layout."""
    out, width = matrix.shape
    stacked = matrix.view(out, experts, width // experts)
    return stacked.permute(1, 2, 0) if transposed else stacked.transpose(0, 1)


def _scale_view(scale: torch.Tensor, experts: int, transposed: bool) -> torch.Tensor:
    """A per-expert, per-output scale ``(E * out,)`` shaped to broadcast over the weight's layout."""
    return scale.view(experts, 1, -1) if transposed else scale.view(experts, -1, 1)


def _chunk_range(group: slice, weight: torch.Tensor, chunks_t: torch.Tensor, transposed: bool) -> slice:
    """The chunks of the experts in ``group``, in ``chunks_t`` ``(1, E * in / C, C, C)``."""
    per_expert = weight.shape[1 if transposed else 2] // chunks_t.shape[-1]
    return slice(group.start * per_expert, group.stop * per_expert)


class _RotateExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        weight: torch.Tensor, chunks_t: torch.Tensor, scale: torch.Tensor | None, transposed: bool
    ) -> torch.Tensor:
        rotated = torch.empty_like(weight, memory_format=torch.contiguous_format)
        for group in _groups(weight.shape[0]):
            part = weight[group]
            chunks = chunks_t[:, _chunk_range(group, weight, chunks_t, transposed)]
            product = ops.butterfly(_side_by_side(part, transposed), chunks, chunks_t.shape[-1])
            rotated[group] = _stacked(product, part.shape[0], transposed)
        return rotated if scale is None else rotated.mul_(_scale_view(scale, weight.shape[0], transposed))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        weight, chunks_t, scale, transposed = inputs
        ctx.transposed = transposed
        ctx.save_for_backward(weight, chunks_t, *((scale, output) if scale is not None else ()))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, chunks_t, *scaled = ctx.saved_tensors
        experts, transposed = weight.shape[0], ctx.transposed
        need_weight, need_chunks, need_scale = ctx.needs_input_grad[:3]
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_chunks = torch.empty_like(chunks_t) if need_chunks else None
        grad_scale = torch.empty_like(scaled[0]) if scaled and need_scale else None
        for group in _groups(experts):
            part = grad[group]
            if scaled:
                scale, output = scaled
                view = _scale_view(scale, experts, transposed)[group]
                if grad_scale is not None:
                    # d/ds of (rotated * s) is rotated = output / s: the kept output, no rotated copy kept.
                    summed = (part * output[group]).sum(1 if transposed else 2).reshape(-1)
                    rows = summed.shape[0] // (group.stop - group.start)
                    grad_scale[group.start * rows : group.stop * rows] = summed / view.reshape(-1)
                part = part * view
            if not (need_weight or need_chunks):
                continue
            chunks = _chunk_range(group, weight, chunks_t, transposed)
            group_weight, group_chunks = torch.ops.orthoft.butterfly_backward.default(
                _side_by_side(part, transposed),
                _side_by_side(weight[group], transposed),
                chunks_t[:, chunks],
                chunks_t.shape[-1],
                [need_weight, need_chunks],
            )
            if grad_weight is not None:
                grad_weight[group] = _stacked(group_weight, group.stop - group.start, transposed)
            if grad_chunks is not None:
                grad_chunks[:, chunks] = group_chunks
        return grad_weight, grad_chunks, grad_scale, None


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
