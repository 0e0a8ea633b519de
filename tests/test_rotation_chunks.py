"""The dense chunks of a butterfly rotation R, and W @ R^T through them."""

from __future__ import annotations

import pytest
import torch

from orthoft import reference
from orthoft.layers.rotation import rotate_rows_transposed, rotation_chunks


@pytest.mark.parametrize(("block_size", "factors"), [(4, 1), (2, 2), (4, 3), (2, 4), (2, 6), (2, 7)])
def test_chunks_and_rotated_rows_match_the_dense_rotation(block_size: int, factors: int) -> None:
    torch.manual_seed(0)
    n = block_size * 2 ** (factors - 1) * 3
    rotations = torch.randn(factors, n // block_size, block_size, block_size, dtype=torch.float64)
    dense = reference.butterfly_matrix(rotations, block_size)
    torch.testing.assert_close(torch.block_diag(*rotation_chunks(rotations, block_size)), dense)
    matrix = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(rotate_rows_transposed(matrix, rotations, block_size), matrix @ dense.mT)
