"""Low-rank factors ``left @ right`` of a batch of matrices ``(g, rows, cols)``, as LoRA stores them.

Three ways, chosen by what is asked:

- **full rank**: ``min(rows, cols)`` factors reproduce the matrix exactly without any SVD: the identity
  on the smaller side and the matrix itself on the other.
- **exact**: the truncated SVD (the best approximation of that rank in Frobenius norm, Eckart-Young).
  Needed for an energy fraction, which reads the whole spectrum.
- **randomized**: a few columns' worth of subspace iteration (Halko, Martinsson and Tropp 2011,
  algorithm 4.4) then an SVD of the small projected matrix: ``O(rows * cols * q * (2p + 2))`` for
  ``q = rank + oversampling`` columns and ``p`` power iterations, instead of ``O(rows * cols^2)``. Its
  error is at most a little above the exact SVD's; the random draw comes from its own generator, so the
  result is reproducible and the caller's random state is untouched.

All batch entries get the same rank (a grouped convolution's LoRA has ``rank / groups`` per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Subspace iteration settings of the randomized path: oversampling max(rank, MIN_OVERSAMPLING) columns and
# POWER_ITERATIONS passes keep its error within about 0.1% of the exact SVD's at ranks 16 and 64 on the
# flattest spectra an OFT delta has (random rotations; benchmarks/lora_export.py records both errors).
MIN_OVERSAMPLING = 16
POWER_ITERATIONS = 6
# The randomized path is used while its q columns are at most this fraction of min(rows, cols);
# above it an exact SVD costs about as much.
RANDOMIZED_MAX_FRACTION = 0.25

SVD_MODES = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class Factors:
    """``left`` ``(g, rows, k)`` and ``right`` ``(g, k, cols)`` with ``left @ right`` close to the matrix."""

    left: torch.Tensor
    right: torch.Tensor
    method: str  # "full rank", "exact SVD" or "randomized SVD"

    @property
    def rank(self) -> int:
        return self.left.shape[-1]


def full_rank(matrices: torch.Tensor) -> Factors:
    """Exact factors of rank ``min(rows, cols)``: the identity on the smaller side."""
    g, rows, cols = matrices.shape
    if cols <= rows:
        eye = torch.eye(cols, dtype=matrices.dtype, device=matrices.device).expand(g, cols, cols)
        return Factors(matrices, eye.contiguous(), "full rank")
    eye = torch.eye(rows, dtype=matrices.dtype, device=matrices.device).expand(g, rows, rows)
    return Factors(eye.contiguous(), matrices, "full rank")


def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """The smallest ``k`` such that, in every batch entry, the ``k`` largest squared singular values hold
    at least ``fraction`` of the total (at least 1). ``singular_values`` ``(g, n)``, in decreasing order."""
    energy = singular_values.double().square().cumsum(-1)
    needed = fraction * energy[:, -1:]
    # Index of the first cumulative energy reaching the fraction, per entry, plus one to include it.
    ranks = (energy < needed).sum(-1) + 1
    return int(ranks.clamp(max=singular_values.shape[-1]).max())


def exact(matrices: torch.Tensor, rank: int | float) -> Factors:
    """Truncated SVD at ``rank`` (an int) or at an energy fraction (a float); singular values in ``left``."""
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    k = rank if isinstance(rank, int) else energy_rank(s, rank)
    return Factors(u[..., :k] * s[:, None, :k], vh[:, :k], "exact SVD")


def randomized(matrices: torch.Tensor, rank: int, generator: torch.Generator) -> Factors:
    """Rank-``rank`` factors by randomized subspace iteration (see the module's docstring)."""
    g, rows, cols = matrices.shape
    q = min(rank + max(rank, MIN_OVERSAMPLING), rows, cols)
    probe = torch.randn(g, cols, q, generator=generator, device=matrices.device, dtype=matrices.dtype)
    basis = torch.linalg.qr(matrices @ probe).Q
    transposed = matrices.mT
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(matrices @ torch.linalg.qr(transposed @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.mT @ matrices, full_matrices=False)
    return Factors((basis @ u[..., :rank]) * s[:, None, :rank], vh[:, :rank], "randomized SVD")


def uses_randomized(rank: int, max_rank: int) -> bool:
    """Whether ``svd="auto"`` takes the randomized path for an int ``rank`` of at most ``max_rank``."""
    return rank + max(rank, MIN_OVERSAMPLING) <= RANDOMIZED_MAX_FRACTION * max_rank


def factorize(matrices: torch.Tensor, rank: int | float, svd: str, generator: torch.Generator) -> Factors:
    """Factors of ``matrices`` ``(g, rows, cols)`` at ``rank``: an int (capped at ``min(rows, cols)``, where
    the factors are exact whatever ``svd`` says) or a fraction in (0, 1] of the squared singular values
    (1.0: exact; below, the exact SVD: ``svd="randomized"`` is an error)."""
    max_rank = min(matrices.shape[1:])
    if (isinstance(rank, float) and rank == 1.0) or (isinstance(rank, int) and rank >= max_rank):
        return full_rank(matrices)
    if isinstance(rank, float) and svd == "randomized":
        raise ValueError(
            f"svd='randomized' needs an int rank; an energy fraction ({rank}) reads every singular value"
        )
    if isinstance(rank, float) or svd == "exact":
        return exact(matrices, rank)
    if svd == "randomized" or uses_randomized(rank, max_rank):
        return randomized(matrices, rank, generator)
    return exact(matrices, rank)
