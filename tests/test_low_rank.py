"""The low-rank factorizations behind the export to LoRA, against torch's exact SVD in float64."""

from __future__ import annotations

import pytest
import torch

from orthoft import OFTLinear
from orthoft.low_rank import energy_rank, exact, factorize, full_rank, gram, randomized, uses_randomized

from peft_interop import one_thread  # noqa: F401 (a fixture, used by name)

pytestmark = pytest.mark.usefixtures("one_thread")


def oft_delta(out: int, features: int, block_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ``(1, out, in)`` delta ``W R^T - W`` of an OFT layer with a random rotation (a flat spectrum:
    the hardest case for a randomized SVD)."""
    layer = OFTLinear(features, out, block_size=block_size, dtype=dtype)
    with torch.no_grad():
        layer.oft_R["default"].weight.normal_(0, 0.1)
        return layer.get_delta_weight().unsqueeze(0)


def best_error(matrix: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the smallest relative error of any rank-``rank`` approximation."""
    s = torch.linalg.svdvals(matrix)
    return float(s[..., rank:].square().sum().sqrt() / s.square().sum().sqrt())


def error(matrix: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    return float((matrix - left @ right).norm() / matrix.norm())


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_full_rank_factors_are_exact_without_svd(shape: tuple[int, int]) -> None:
    matrices = torch.randn(2, *shape, dtype=torch.float64)
    factors = full_rank(matrices)
    assert factors.rank == min(shape) and factors.method == "full rank"
    assert torch.equal(factors.left @ factors.right, matrices)


def test_exact_truncation_reaches_the_eckart_young_bound() -> None:
    matrix = oft_delta(48, 32, 8)
    for rank in (1, 5, 16):
        factors = exact(matrix, rank)
        assert factors.rank == rank
        assert error(matrix, factors.left, factors.right) == pytest.approx(
            best_error(matrix, rank), rel=1e-10
        )


def test_energy_rank_keeps_the_fewest_singular_values_holding_the_fraction() -> None:
    s = torch.tensor([[4.0, 2.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    # Energies 16, 4, 1, 1 of 22: 16/22 = 0.727, 20/22 = 0.909, 21/22 = 0.955. The second row needs one.
    assert energy_rank(s, 0.7) == 1
    assert energy_rank(s, 0.8) == 2
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(s, 1.0) == 4
    assert energy_rank(torch.zeros(1, 3), 0.5) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(576, 384), (384, 576)])
@pytest.mark.parametrize("svd", ["auto", "randomized"])
def test_default_and_krylov_svd_reach_the_exact_truncated_svds_error(
    shape: tuple[int, int], dtype: torch.dtype, svd: str
) -> None:
    out, features = shape
    matrix = oft_delta(out, features, 16, dtype)
    generator = torch.Generator().manual_seed(0)
    # At rank 64 of 384 the Krylov space would outgrow three quarters of the matrix: it takes the exact SVD.
    for rank in (2, 8, 16, 64) if svd == "auto" else (2, 8, 16):
        krylov = svd == "randomized" or uses_randomized(rank, 384)
        factors = factorize(matrix, rank, svd, generator)
        assert factors.method == ("randomized SVD" if krylov else "Gram eigendecomposition")
        assert factors.rank == rank
        assert factors.left.dtype == dtype and factors.right.shape == (1, rank, features)
        exact_factors = exact(matrix, rank)
        best = error(matrix, exact_factors.left, exact_factors.right)
        assert error(matrix, factors.left, factors.right) == pytest.approx(best, rel=1e-5, abs=0)


def test_gram_path_keeps_a_small_left_out_energy_exact() -> None:
    """Where the left-out energy is a tiny fraction, float32 Gram rounding would show: float64 takes over."""
    matrix = oft_delta(300, 200, 8)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    s[:, 40:] *= 1e-3  # the energy beyond rank 40 is about 1e-6 of the total
    steep = (u * s[:, None, :] @ vh).float()
    factors = gram(steep, 40)
    exact_factors = exact(steep.double(), 40)
    best = error(steep.double(), exact_factors.left, exact_factors.right)
    assert error(steep, factors.left, factors.right) == pytest.approx(best, rel=1e-3, abs=0)
    fraction = gram(steep, 0.99)
    assert fraction.rank == exact(steep.double(), 0.99).rank


def test_krylov_svd_of_a_batch_and_of_a_zero_matrix() -> None:
    matrices = torch.cat([oft_delta(200, 160, 8), oft_delta(200, 160, 8), torch.zeros(1, 200, 160)])
    factors = randomized(matrices.double(), 4, torch.Generator().manual_seed(0))
    assert factors.method == "randomized SVD"
    for index in range(2):
        assert error(matrices[index], factors.left[index], factors.right[index]) == pytest.approx(
            best_error(matrices[index], 4), rel=1e-5, abs=0
        )
    assert torch.equal(factors.left[2] @ factors.right[2], torch.zeros(200, 160, dtype=torch.float64))


def test_randomized_svd_leaves_the_global_random_state_alone() -> None:
    matrix = oft_delta(96, 64, 8)
    state = torch.get_rng_state()
    first = randomized(matrix, 4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    second = randomized(matrix, 4, torch.Generator().manual_seed(0))
    assert torch.equal(first.left, second.left) and torch.equal(first.right, second.right)


def test_factorize_picks_the_path_from_the_rank() -> None:
    matrix = oft_delta(96, 64, 8)
    generator = torch.Generator().manual_seed(0)
    assert factorize(matrix, 64, "auto", generator).method == "full rank"
    assert factorize(matrix, 1000, "exact", generator).method == "full rank"
    assert factorize(matrix, 1.0, "auto", generator).method == "full rank"
    assert factorize(matrix, 0.5, "auto", generator).method == "Gram eigendecomposition"
    assert factorize(matrix, 0.5, "exact", generator).method == "exact SVD"
    with pytest.raises(ValueError, match=r"svd='randomized' needs an int rank"):
        factorize(matrix, 0.5, "randomized", generator)
    assert factorize(matrix, 40, "auto", generator).method == "Gram eigendecomposition"
    assert not uses_randomized(40, 64) and uses_randomized(24, 1024) and not uses_randomized(25, 1024)
    assert factorize(oft_delta(640, 640, 8), 8, "auto", generator).method == "randomized SVD"
    assert factorize(matrix, 40, "exact", generator).method == "exact SVD"
    # A Krylov space of half the matrix would cost more than the exact SVD it stands for.
    assert factorize(matrix, 40, "randomized", generator).method == "exact SVD"
    assert factorize(oft_delta(300, 200, 8), 8, "randomized", generator).method == "randomized SVD"
