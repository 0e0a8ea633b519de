"""Pure PyTorch reference of every orthoft operator.

These functions define what the compiled kernels compute. They favour clarity over speed and
are what the tests compare against in float64. They also serve CUDA tensors when the build has
no CUDA kernels.
"""

from __future__ import annotations

import torch


def block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """``(..., D, b, b) -> (..., D*b, D*b)`` with the blocks on the diagonal."""
    *batch, num_blocks, b, _ = blocks.shape
    eye = torch.eye(num_blocks, dtype=blocks.dtype, device=blocks.device)
    # out[..., i, p, j, q] = eye[i, j] * blocks[..., i, p, q]
    out = eye[:, None, :, None] * blocks.unsqueeze(-2)
    return out.reshape(*batch, num_blocks * b, num_blocks * b)


def block_diag_backward(grad: torch.Tensor, block_size: int) -> torch.Tensor:
    """The diagonal ``b x b`` blocks of ``grad``: ``(..., D*b, D*b) -> (..., D, b, b)``."""
    *batch, n, _ = grad.shape
    d = n // block_size
    g = grad.reshape(*batch, d, block_size, d, block_size)
    idx = torch.arange(d, device=grad.device)
    return g[..., idx, :, idx, :].movedim(0, -3)


def neumann_coefficients(num_terms: int) -> list[float]:
    """Coefficients of ``S^0 .. S^j`` in PEFT's Cayley-Neumann series with ``num_terms`` terms."""
    if num_terms <= 1:
        return [1.0]
    if num_terms == 2:
        return [1.0, 2.0]
    top = max(num_terms, 4) - 1  # k = 3 is computed as k = 4 by PEFT
    return [1.0] + [2.0] * (top - 1) + [1.0]


def cayley(skew: torch.Tensor, num_neumann_terms: int = 0) -> torch.Tensor:
    """Cayley transform of a batch ``(..., b, b)`` of skew-symmetric matrices.

    ``num_neumann_terms == 0``: exact, ``R = (I - S) inv(I + S)``.
    ``num_neumann_terms > 0``: PEFT's truncated series ``I + 2S + ... + S^j``.
    """
    b = skew.shape[-1]
    eye = torch.eye(b, dtype=skew.dtype, device=skew.device).expand_as(skew)
    if num_neumann_terms == 0:
        return torch.linalg.solve(eye + skew, eye - skew, left=False)
    coeffs = neumann_coefficients(num_neumann_terms)
    out = eye.clone()
    power = eye
    for c in coeffs[1:]:
        power = power @ skew
        out = out + c * power
    return out


def cayley_backward(
    grad: torch.Tensor, skew: torch.Tensor, rotation: torch.Tensor, num_neumann_terms: int = 0
) -> torch.Tensor:
    """Gradient of ``cayley`` for ``skew``, taken as a general matrix.

    Exact: ``R = 2 inv(I+S) - I``, so ``dS = -2 inv(I+S)^T G inv(I+S)^T`` with ``inv(I+S) = (R+I)/2``.
    Neumann: ``dS = sum_j c_j sum_{a<j} (S^T)^a G (S^T)^(j-1-a)``.
    """
    if num_neumann_terms == 0:
        a = rotation + torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
        return -0.5 * a.mT @ grad @ a.mT
    st = skew.mT
    powers = [torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)]
    coeffs = neumann_coefficients(num_neumann_terms)
    for _ in coeffs[2:]:
        powers.append(powers[-1] @ st)
    out = torch.zeros_like(skew)
    for j, c in enumerate(coeffs):
        for a in range(j):
            out = out + c * powers[a] @ grad @ powers[j - 1 - a]
    return out


def butterfly_permutation(n: int, block_size: int, factor: int) -> torch.Tensor:
    """Index map ``perm`` of BOFT factor ``factor`` (``P[j, perm[j]] = 1``).

    The range is split into chunks of ``block_size * 2**factor``; each chunk into groups of
    ``block_size // 2`` consecutive indices, even-numbered groups first, then odd ones.
    Factor 0 is the identity.
    """
    if factor == 0:
        return torch.arange(n)
    half = block_size // 2
    chunk = block_size * 2**factor
    groups = torch.arange(chunk // half)
    order = torch.cat([groups[0::2], groups[1::2]])
    local = (order[:, None] * half + torch.arange(half)).reshape(-1)
    starts = torch.arange(0, n, chunk)
    return (starts[:, None] + local).reshape(-1)


def _block_members(n: int, block_size: int, factor: int, device: torch.device) -> torch.Tensor:
    """Columns of each block of factor ``factor``, block by block: the inverse of its permutation."""
    return torch.argsort(butterfly_permutation(n, block_size, factor)).to(device)


def _apply_factor(y: torch.Tensor, rotations: torch.Tensor, factor: int, block_size: int) -> torch.Tensor:
    """``y @ M_factor`` with ``M_factor = P blockdiag(rotations[factor]) P^T``."""
    members = _block_members(y.shape[-1], block_size, factor, y.device)
    d = rotations.shape[1]
    z = y[..., members].reshape(*y.shape[:-1], d, block_size)  # y @ P, as blocks
    w = torch.einsum("...dk,dkc->...dc", z, rotations[factor]).reshape(y.shape)
    out = torch.empty_like(w)
    out[..., members] = w  # @ P^T
    return out


def butterfly(x: torch.Tensor, rotations: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x @ M_{m-1} @ ... @ M_0`` with ``M_i = P_i blockdiag(rotations[i]) P_i^T``."""
    y = x
    for i in reversed(range(rotations.shape[0])):
        y = _apply_factor(y, rotations, i, block_size)
    return y


def butterfly_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    rotations: torch.Tensor,
    block_size: int,
    output_mask: tuple[bool, bool] | list[bool] = (True, True),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``butterfly`` for ``x`` and ``rotations``: back through the factors, M_0 first.

    A gradient whose ``output_mask`` flag is false is not computed and comes back as an empty tensor.
    """
    m, d, b, _ = rotations.shape
    factor_inputs = [x] * m
    for i in reversed(range(1, m)):
        factor_inputs[i - 1] = _apply_factor(factor_inputs[i], rotations, i, block_size)
    grad_rotations = torch.empty_like(rotations)
    g = grad
    for i in range(m):
        members = _block_members(x.shape[-1], block_size, i, x.device)
        z = factor_inputs[i][..., members].reshape(*g.shape[:-1], d, b)
        gz = g[..., members].reshape(*g.shape[:-1], d, b)
        grad_rotations[i] = torch.einsum("...dk,...dc->dkc", z, gz)
        g_blocks = torch.einsum("...dc,dkc->...dk", gz, rotations[i]).reshape(g.shape)
        g = torch.empty_like(g_blocks)
        g[..., members] = g_blocks
    need_x, need_rotations = output_mask
    return (g if need_x else x.new_empty(0)), (grad_rotations if need_rotations else rotations.new_empty(0))


def butterfly_matrix(rotations: torch.Tensor, block_size: int) -> torch.Tensor:
    """The dense ``N x N`` product ``M_{m-1} @ ... @ M_0``, built from permutation matrices.

    This is PEFT's construction; it exists to check the index-map operators against it.
    """
    m, d, b, _ = rotations.shape
    n = d * b
    total = torch.eye(n, dtype=rotations.dtype, device=rotations.device)
    for i in range(m):
        perm = butterfly_permutation(n, block_size, i)
        p = torch.zeros(n, n, dtype=rotations.dtype, device=rotations.device)
        p[torch.arange(n), perm] = 1
        factor = p @ torch.block_diag(*rotations[i]) @ p.T
        total = factor @ total
    return total


def channel_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., F, P)``: at each of its ``P`` positions, the row of ``F`` channels times
    ``blockdiag(blocks)``."""
    return (x.mT @ block_diag(blocks)).mT


def channel_blocks_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    blocks: torch.Tensor,
    output_mask: tuple[bool, bool] | list[bool] = (True, True),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``channel_blocks`` for ``x`` and ``blocks``; one not asked for is an empty tensor."""
    d, c, _ = blocks.shape
    need_x, need_blocks = output_mask
    grad_x = (grad.mT @ block_diag(blocks).mT).mT if need_x else x.new_empty(0)
    x_chunks = x.reshape(*x.shape[:-2], d, c, x.shape[-1])
    grad_chunks = grad.reshape(*grad.shape[:-2], d, c, grad.shape[-1])
    grad_blocks = (
        torch.einsum("...dkp,...dip->dki", x_chunks, grad_chunks) if need_blocks else blocks.new_empty(0)
    )
    return grad_x.contiguous(), grad_blocks.contiguous()
