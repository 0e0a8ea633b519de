"""Helpers shared by the layers to build rotation blocks: skew matrices, COFT, dropout, dense form."""

from __future__ import annotations

import math

import torch

from .. import ops


def packed_skew(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(n, b*(b-1)/2)`` strict upper triangles -> ``(n, b, b)`` skew matrices ``Q - Q^T`` (OFT's layout)."""
    b, k = block_size, packed.shape[1]
    rows, cols = torch.triu_indices(b, b, 1, device=packed.device)
    # Each entry of the flat blocks gathered from [0, packed, -packed]: one index_select, whose backward
    # is one index_add, in less time than writing the upper triangle and subtracting its transpose.
    source = torch.zeros(b * b, dtype=torch.long, device=packed.device)
    entries = torch.arange(1, k + 1, device=packed.device)
    source[rows * b + cols] = entries
    source[cols * b + rows] = entries + k
    signed = torch.cat([packed.new_zeros(packed.shape[0], 1), packed, -packed], 1)
    return signed.index_select(1, source).view(-1, b, b)


def block_skew(blocks: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric part ``(B - B^T) / 2`` of each block (BOFT's parameterisation)."""
    return 0.5 * (blocks - blocks.mT)


def project_packed_skew(packed: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT: each skew block moved into the Frobenius ball of radius ``eps / sqrt(n)`` around 0.

    PEFT's ``_project_batch`` on the packed form: a block already inside the ball is kept, any other
    is scaled onto its surface. ``n`` is the number of stored blocks. A block that rounding left a
    few ulps outside counts as inside, so that projecting twice changes nothing.
    """
    radius = eps / math.sqrt(packed.shape[0])
    # ||Q - Q^T||_F counts each stored entry twice.
    norm = math.sqrt(2.0) * torch.linalg.vector_norm(packed, dim=-1, keepdim=True)
    inside = norm <= radius * (1 + 8 * torch.finfo(packed.dtype).eps)
    return torch.where(inside, packed, packed * (radius / norm))


def cayley_blocks(skew: torch.Tensor, num_neumann_terms: int) -> torch.Tensor:
    """Rotations from skew matrices of any batch shape ``(..., b, b)`` (0 terms: exact Cayley)."""
    b = skew.shape[-1]
    return ops.cayley(skew.reshape(-1, b, b), num_neumann_terms).reshape(skew.shape)


def drop_blocks(rotations: torch.Tensor, p: float, groups: int = 1) -> torch.Tensor:
    """Multiplicative dropout of rotations ``(m, D, b, b)``.

    In one randomly chosen factor, ``int(p * D)`` randomly chosen blocks are replaced by the identity.
    With ``groups`` (the experts of a fused weight, each ``D / groups`` blocks) each group drops its own.
    """
    m, n, b, _ = rotations.shape
    d = n // groups
    count = int(p * d)
    if count == 0:
        return rotations
    dropped = torch.zeros(m, groups, d, 1, 1, dtype=torch.bool)
    for group in range(groups):
        dropped[torch.randint(m, ()), group, torch.randperm(d)[:count]] = True
    eye = torch.eye(b, dtype=rotations.dtype, device=rotations.device)
    return torch.where(dropped.view(m, n, 1, 1).to(rotations.device), eye, rotations)


def dense_rotation(rotations: torch.Tensor, block_size: int) -> torch.Tensor:
    """The dense ``N x N`` matrix ``R`` of butterfly ``rotations`` ``(m, N/b, b, b)``: ``I @ R``."""
    n = rotations.shape[1] * block_size
    eye = torch.eye(n, dtype=rotations.dtype, device=rotations.device)
    return ops.butterfly(eye, rotations, block_size)


def chunk_size(num_factors: int, block_size: int) -> int:
    """``C = b * 2^(m-1)``: ``R`` of ``m`` butterfly factors is block diagonal in chunks of ``C``."""
    return block_size * 2 ** (num_factors - 1)


def rotation_chunks(rotations: torch.Tensor, block_size: int) -> torch.Tensor:
    """The diagonal chunks ``(N/C, C, C)`` of ``R`` for butterfly ``rotations`` ``(m, N/b, b, b)``.

    With one factor they are the blocks themselves. Otherwise one butterfly call on a ``C x N`` tiled
    identity gives them all: its row ``r`` has a 1 in column ``r`` of every chunk, so row ``r`` of the
    product holds row ``r`` of every chunk of ``R``.
    """
    m, d, b, _ = rotations.shape
    if m == 1:
        return rotations[0]
    c, n = chunk_size(m, block_size), d * b
    tiled = torch.eye(c, dtype=rotations.dtype, device=rotations.device).repeat(1, n // c)
    return ops.butterfly(tiled, rotations, block_size).reshape(c, n // c, c).transpose(0, 1)


def _chunks_are_cheaper(num_factors: int) -> bool:
    """Products with the dense chunks cost ``C = b * 2^(m-1)`` per entry, ``m`` padded butterfly calls
    ``b * m^2``: the chunks win up to ``m = 6``."""
    return 2 ** (num_factors - 1) <= num_factors**2


def times_chunks_transposed(matrix: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    """``matrix @ R^T`` for ``R = blockdiag(chunks)``, ``chunks`` ``(N/C, C, C)``: the butterfly operator
    with one factor, the transposed chunks as its blocks."""
    return ops.butterfly(matrix, chunks.mT.unsqueeze(0), chunks.shape[-1])


def rotate_rows_transposed(matrix: torch.Tensor, rotations: torch.Tensor, block_size: int) -> torch.Tensor:
    """``matrix @ R^T`` for butterfly ``rotations`` ``(m, N/b, b, b)``, without forming ``R``.

    Up to a few factors: by the dense chunks of ``R`` (with one factor, its blocks). Many factors:
    ``R^T = M_0^T @ ... @ M_{m-1}^T`` and ``M_i^T`` is factor ``i`` with transposed blocks, so each factor
    goes through the butterfly operator alone, the other factors set to the identity.
    """
    m = rotations.shape[0]
    if _chunks_are_cheaper(m):
        return times_chunks_transposed(matrix, rotation_chunks(rotations, block_size))
    transposed = rotations.mT
    eye = torch.eye(block_size, dtype=rotations.dtype, device=rotations.device).expand_as(rotations[0])
    for i in range(m):
        factors = torch.stack([transposed[j] if j == i else eye for j in range(m)])
        matrix = ops.butterfly(matrix, factors, block_size)
    return matrix
