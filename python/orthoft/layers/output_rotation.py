"""The output-side rotations of LyCORIS's diag-OFT and BOFT, as orthoft's butterfly factors.

LyCORIS stores raw blocks ``B`` (``oft_blocks``) and rotates a layer's output rows:
``Q = B - B^T``, optionally scaled down to the Frobenius norm ``constraint`` (over all blocks), and
``R = (I + Q) inv(I - Q)``. diag-OFT turns the output ``y = x @ W^T`` into ``y @ blockdiag(R_k)``; BOFT
runs ``y`` through ``m`` stages, stage ``i`` applying ``R_i`` transposed to the blocks that pair each
index with the one ``2^i * b/2`` further in chunks of ``2^i * b``, smallest chunks first.

Here both are one matrix ``A`` in orthoft's butterfly form (``A = M_{m-1} @ ... @ M_0``, factors given
as ``(m, D, b, b)`` blocks, see ``orthoft.ops.butterfly``) such that the adapted weight is ``A @ W`` and
the adapted output ``y @ A^T``. Stage ``i`` of BOFT mixes the same indices as butterfly factor ``i``,
in another order inside each block (LyCORIS interleaves the two halves), which is a fixed permutation
of each block. ``y @ A^T`` applies ``M_0^T`` first, which is LyCORIS's order; the butterfly operator's
gradient for ``x`` computes exactly ``grad @ A^T``, so one operator call does it.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _checks, ops
from .rotation import cayley_blocks

__all__ = [
    "boft_factors",
    "constrained_skew",
    "diag_oft_factors",
    "lycoris_block_split",
    "lycoris_butterfly_split",
    "times_transposed",
]


def lycoris_block_split(dim: int, block_size: int) -> tuple[int, int]:
    """``(b, D)`` with ``b * D = dim`` and ``b <= D``: the block size and count LyCORIS's diag-OFT picks for
    ``dim`` output features from the requested ``block_size`` (its ``lora_dim``; -1: as square as it gets).

    A requested size that divides ``dim`` is kept unless it exceeds ``dim / size`` (then the two swap);
    otherwise the largest divisor up to the request on the way to ``sqrt(dim)``.
    """
    if block_size > 0 and dim % block_size == 0:
        low, high = sorted((block_size, dim // block_size))
        return low, high
    limit = dim if block_size < 0 else block_size
    size = 1
    while size < dim // size:
        following = next(d for d in range(size + 1, dim + 1) if dim % d == 0)
        if following > limit:
            break
        size = following
    low, high = sorted((size, dim // size))
    return low, high


def lycoris_butterfly_split(dim: int, block_size: int) -> tuple[int, int, int] | None:
    """``(b, D, m)`` as LyCORIS's BOFT picks them for ``dim`` output features: ``b`` the largest even size up
    to ``block_size`` (-1: up to ``dim``) with ``D = dim / b`` a power of two, ``m = log2(D) + 1`` stages (the
    full butterfly); ``None`` when no such size exists."""
    limit = dim if block_size == -1 else block_size
    count = 0
    for size in range(2, limit + 1, 2):
        if dim % size == 0 and (dim // size).bit_count() == 1:
            count = dim // size
    if count == 0:
        return None
    return dim // count, count, count.bit_length()


def constrained_skew(oft_blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """``Q = B - B^T`` of every block, scaled to the Frobenius norm ``constraint`` (of all blocks at once)
    where it is larger; ``constraint = 0``: no limit. Without a branch on the norm (no device sync)."""
    skew = oft_blocks - oft_blocks.mT
    if constraint <= 0:
        return skew
    factor = (constraint / (torch.linalg.vector_norm(skew) + 1e-8)).clamp(max=1.0)
    return skew * factor


def diag_oft_factors(oft_blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """``(1, D, b, b)``: ``A = blockdiag(R_k^T)`` for diag-OFT's ``oft_blocks`` ``(D, b, b)``.

    ``R^T = (I - Q) inv(I + Q)`` is orthoft's Cayley transform of ``Q`` itself.
    """
    return cayley_blocks(constrained_skew(oft_blocks, constraint), 0).unsqueeze(0)


def _interleaved_order(block_size: int, device: torch.device) -> torch.Tensor:
    """For each position ``g * b/2 + t`` of a butterfly block (orthoft's order: the lower half's ``b/2``
    indices, then the upper half's), the position ``2 t + g`` that LyCORIS gives that index."""
    half = block_size // 2
    position = torch.arange(block_size, device=device)
    return 2 * (position % half) + position // half


def boft_factors(oft_blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """``(m, D, b, b)`` butterfly factors of BOFT's ``A`` for its ``oft_blocks`` ``(m, D, b, b)``.

    Factor ``i`` holds LyCORIS's ``R_i = (I + Q) inv(I - Q)`` (orthoft's Cayley transform of ``-Q``),
    rows and columns reordered from LyCORIS's interleaved block order to the butterfly's.
    """
    order = _interleaved_order(oft_blocks.shape[-1], oft_blocks.device)
    skew = -constrained_skew(oft_blocks, constraint)
    return cayley_blocks(skew[..., order, :][..., order], 0)


class _TimesTransposed(torch.autograd.Function):
    """``y @ A^T`` for butterfly factors ``(m, D, b, b)``: the butterfly's input gradient, with the
    butterfly itself and its factor gradient (inputs swapped) as the backward."""

    @staticmethod
    def forward(y: torch.Tensor, factors: torch.Tensor, block_size: int) -> torch.Tensor:
        out, _ = torch.ops.orthoft.butterfly_backward.default(y, y, factors, block_size, [True, False])
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        y, factors, block_size = inputs
        ctx.block_size = block_size
        ctx.save_for_backward(y, factors)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        y, factors = ctx.saved_tensors
        need_y, need_factors = ctx.needs_input_grad[:2]
        grad_y = ops.butterfly(grad, factors, ctx.block_size) if need_y else None
        grad_factors = None
        if need_factors:
            # <grad, y A^T> = <grad A, y>: the factors' gradient of the butterfly at input grad, upstream y.
            _, grad_factors = torch.ops.orthoft.butterfly_backward.default(
                y.contiguous(), grad.contiguous(), factors, ctx.block_size, [False, True]
            )
        return grad_y, grad_factors, None


def times_transposed(y: torch.Tensor, factors: torch.Tensor, block_size: int) -> torch.Tensor:
    """``y @ A^T`` on the last dimension of ``y``, ``A`` the butterfly of ``factors`` ``(m, D, b, b)``."""
    if factors.shape[0] == 1:
        return ops.butterfly(y, factors.mT, block_size)
    _checks.butterfly(_checks.raise_error, y, factors, block_size)
    return _TimesTransposed.apply(y, factors, block_size)
