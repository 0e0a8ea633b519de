"""Low-rank factors ``left @ right`` of a batch of matrices ``(g, rows, cols)``, as LoRA stores them.

Four ways, chosen by what is asked:

- **full rank**: ``min(rows, cols)`` factors reproduce the matrix exactly without any SVD: the identity
  on the smaller side and the matrix itself on the other.
- **exact**: LAPACK's truncated SVD (the best approximation of that rank in Frobenius norm,
  Eckart-Young), as PEFT's converter computes it.
- **Gram** (the default below full rank, but for the smallest int ranks; energy fractions too, which read
  the whole spectrum): the eigendecomposition of the smaller Gram matrix ``M^T M`` (or ``M M^T``): its
  eigenvectors are the right (left) singular vectors, so its top ``rank`` give the
  truncated SVD's factors, with the same error to float rounding (1e-13 relative on OFT deltas, where
  float32 keeps the left-out energy exact: ``GRAM_FLOAT64_BELOW`` switches to float64 where it would not).
  One product and a symmetric eigensolver cost about a quarter of LAPACK's SVD of the same matrix.
- **randomized**: a block Krylov method (randomized block Lanczos with full reorthogonalization; Musco and
  Musco 2015): from a random block of ``rank + OVERSAMPLING`` vectors on the matrix's smaller side, the
  Krylov space of ``M^T M`` grows a block per step, and the Rayleigh-Ritz step (``eigh`` in float64 of the
  space's small Gram matrix) gives the best rank-``rank`` factors within it. It stops once the energy the
  factors capture gains less than ``TOLERANCE`` of the energy they leave out in a step, so that its error
  equals the exact truncated SVD's to within float rounding (about 1e-6 relative). A Krylov space needs
  far fewer products with the matrix than subspace iteration for that: an OFT delta's spectrum is flat,
  and its top singular values are close together. Should the space grow to ``MAX_KRYLOV_FRACTION`` of
  the smaller side before that, the exact SVD is cheaper and is used instead. It is the default for ranks
  up to ``KRYLOV_DEFAULT_FRACTION`` of the smaller side, where it costs less than the Gram path. The random
  start comes from its own generator: the result is reproducible and the caller's random state is untouched.

All batch entries get the same rank (a grouped convolution's LoRA has ``rank / groups`` per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The Krylov method's block is rank + OVERSAMPLING vectors; it stops when a step adds less than TOLERANCE
# of the energy left out (the relative error then differs from the optimum by about TOLERANCE / 2 or
# less: the gains fall geometrically). benchmarks/lora_export.py records its error against PEFT's.
OVERSAMPLING = 8
TOLERANCE = 1e-6
# Above this fraction of min(rows, cols) the Krylov space costs about as much as the exact SVD.
MAX_KRYLOV_FRACTION = 0.75
# The first convergence check comes after this many blocks (each check is an eigvalsh of the space).
MIN_BLOCKS = 4

SVD_MODES = ("auto", "exact", "randomized")
# svd="auto" takes the Krylov method while rank + OVERSAMPLING is at most this fraction of min(rows, cols):
# below it, the Krylov method is the faster (1024 x 1024 OFT deltas: rank 8 0.48 s against the Gram path's
# 1.02 s for 14 layers, rank 24 alike, rank 40 1.52 s against 1.06 s).
KRYLOV_DEFAULT_FRACTION = 1 / 32
# Below this fraction of the energy left out, float32 rounding in a float32 Gram matrix could show in the
# error: the Gram path then works in float64.
GRAM_FLOAT64_BELOW = 1e-3


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
    if matrices.shape[1] < matrices.shape[2]:
        # LAPACK's SVD of a wide matrix takes about twice as long as that of its transpose.
        v, s, uh = torch.linalg.svd(matrices.mT, full_matrices=False)
        u, vh = uh.mT, v.mT
    else:
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    k = rank if isinstance(rank, int) else energy_rank(s, rank)
    return Factors(u[..., :k] * s[:, None, :k], vh[:, :k], "exact SVD")


def gram(matrices: torch.Tensor, rank: int | float) -> Factors:
    """Truncated SVD at ``rank`` (an int) or an energy fraction (a float) through the eigendecomposition
    of the smaller Gram matrix (see the module's docstring)."""
    transposed = matrices.shape[1] < matrices.shape[2]
    tall = matrices.mT if transposed else matrices  # rows >= cols: the Gram matrix is cols x cols
    for dtype in dict.fromkeys((torch.promote_types(tall.dtype, torch.float32), torch.float64)):
        work = tall.to(dtype)
        values, vectors = torch.linalg.eigh(work.mT @ work)  # ascending
        energy = values.clamp(min=0).flip(-1)
        k = rank if isinstance(rank, int) else energy_rank(energy.sqrt(), rank)
        left_out = energy[:, k:].sum(-1) / energy.sum(-1).clamp(min=torch.finfo(dtype).tiny)
        if dtype == torch.float64 or bool((left_out >= GRAM_FLOAT64_BELOW).all()):
            break
    top = vectors.flip(-1)[..., :k].to(tall.dtype)  # (g, cols, k), largest first
    left, right = tall @ top, top.mT  # M = (M V) V^T on the top right singular vectors V
    if transposed:
        left, right = right.mT, left.mT
    return Factors(left, right, "Gram eigendecomposition")


def _orthonormal(vectors: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``vectors`` made orthonormal and orthogonal to ``basis`` (Gram-Schmidt twice: full precision)."""
    if basis is not None:
        for _ in range(2):
            vectors = vectors - basis @ (basis.mT @ vectors)
    return torch.linalg.qr(vectors).Q


def randomized(matrices: torch.Tensor, rank: int, generator: torch.Generator) -> Factors:
    """Rank-``rank`` factors by a randomized block Krylov method (see the module's docstring); the exact
    SVD where the Krylov space would grow past ``MAX_KRYLOV_FRACTION`` of the smaller side."""
    # Work on the smaller side: columns of ``tall`` (rows >= cols).
    transposed = matrices.shape[1] < matrices.shape[2]
    tall = matrices.mT if transposed else matrices
    g, _, cols = tall.shape
    block = min(rank + OVERSAMPLING, cols)
    total = torch.linalg.vector_norm(tall, dim=(1, 2)).double().square()
    start = torch.randn(g, cols, block, generator=generator, device=tall.device, dtype=tall.dtype)
    basis = _orthonormal(start, None)  # (g, cols, d): orthonormal, spans the Krylov space so far
    images = tall @ basis  # (g, rows, d): the matrix applied to it
    # (g, d, d): the Rayleigh-Ritz matrix basis^T M^T M basis, in float64 so that the convergence test
    # sees the energy gains of a float32 matrix above its rounding.
    gram = images.double().mT @ images.double()
    captured = None
    while True:
        if basis.shape[-1] + block > MAX_KRYLOV_FRACTION * cols:
            return exact(matrices, rank)
        step = _orthonormal(tall.mT @ images[..., -block:], basis)
        step_images = tall @ step
        step_double = step_images.double()
        across = images.double().mT @ step_double
        gram = torch.cat(
            [torch.cat([gram, across], -1), torch.cat([across.mT, step_double.mT @ step_double], -1)], -2
        )
        basis = torch.cat([basis, step], -1)
        images = torch.cat([images, step_images], -1)
        if basis.shape[-1] < MIN_BLOCKS * block:
            continue
        now = torch.linalg.eigvalsh(gram)[..., -rank:].sum(-1)
        if captured is not None and bool(((now - captured) <= TOLERANCE * (total - now).clamp(min=0)).all()):
            break
        captured = now
    _, vectors = torch.linalg.eigh(gram)
    top = vectors[..., -rank:].flip(-1).to(tall.dtype)  # (g, d, rank), largest first
    left, right = images @ top, (basis @ top).mT  # M ~ (M P) P^T with P = basis @ top orthonormal
    if transposed:
        left, right = right.mT, left.mT
    return Factors(left, right, "randomized SVD")


def uses_randomized(rank: int, max_rank: int) -> bool:
    """Whether ``svd="auto"`` takes the Krylov method for an int ``rank`` of at most ``max_rank``."""
    return rank + OVERSAMPLING <= KRYLOV_DEFAULT_FRACTION * max_rank


def factorize(matrices: torch.Tensor, rank: int | float, svd: str, generator: torch.Generator) -> Factors:
    """Factors of ``matrices`` ``(g, rows, cols)`` at ``rank``: an int (capped at ``min(rows, cols)``, where
    the factors are exact whatever ``svd`` says) or a fraction in (0, 1] of the squared singular values
    (1.0: exact; below, ``svd="randomized"`` is an error: it would have to read every singular value).
    ``svd``: ``"auto"`` the Krylov method for the smallest int ranks and the Gram eigendecomposition
    above, ``"exact"`` LAPACK's SVD, ``"randomized"`` the block
    Krylov method."""
    max_rank = min(matrices.shape[1:])
    if (isinstance(rank, float) and rank == 1.0) or (isinstance(rank, int) and rank >= max_rank):
        return full_rank(matrices)
    if isinstance(rank, float) and svd == "randomized":
        raise ValueError(
            f"svd='randomized' needs an int rank; an energy fraction ({rank}) reads every singular value"
        )
    if svd == "exact":
        return exact(matrices, rank)
    if svd == "randomized" or (isinstance(rank, int) and uses_randomized(rank, max_rank)):
        return randomized(matrices, int(rank), generator)
    return gram(matrices, rank)
