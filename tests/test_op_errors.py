"""Bad input gets a clear error, never a crash or a wrong answer."""

from __future__ import annotations

import pytest
import torch

import orthoft
from orthoft import ops


@pytest.mark.parametrize(
    ("shape", "match"),
    [((4, 4), "at least 3 dimensions"), ((2, 3, 4), "square blocks"), ((2, 0, 0), "non-empty square")],
)
def test_block_diag_shapes(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.block_diag(torch.randn(shape))


def test_block_diag_backward_block_size() -> None:
    with pytest.raises(ValueError, match="block_size must be a positive divisor of 12, got 5"):
        torch.ops.orthoft.block_diag_backward(torch.randn(12, 12), 5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        ops.block_diag(torch.ones(2, 3, 3, dtype=dtype))
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        ops.cayley(torch.ones(2, 3, 3, dtype=dtype))
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        ops.butterfly(torch.ones(2, 8, dtype=dtype), torch.ones(1, 2, 4, 4, dtype=dtype), 4)


def test_cayley_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ops.cayley(torch.randn(4))
    with pytest.raises(ValueError, match="square blocks"):
        ops.cayley(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"num_neumann_terms must be 0 \(exact\) or a positive number"):
        ops.cayley(torch.randn(2, 3, 3), -1)


def test_cayley_backward_shape_mismatch() -> None:
    s = torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="same shape"):
        torch.ops.orthoft.cayley_backward(torch.randn(2, 4, 4), s, s, 0)


@pytest.mark.parametrize(
    ("x_shape", "rot_shape", "b", "match"),
    [
        (
            (2, 10),
            (1, 2, 4, 4),
            4,
            r"block_size must be a positive divisor of the last dimension of x \(10\), got 4",
        ),
        ((2, 8), (1, 2, 4, 4), 0, "block_size must be a positive divisor"),
        ((2, 8), (2, 4, 4), 4, r"rotations must have shape \(m, N/b, b, b\)"),
        ((2, 8), (1, 4, 4, 4), 4, r"rotations must have shape \(m, 2, 4, 4\)"),
        ((2, 8), (1, 2, 4, 3), 4, r"rotations must have shape \(m, 2, 4, 4\)"),
        ((2, 8), (0, 2, 4, 4), 4, "between 1 and 30 butterfly factors"),
        ((2, 12), (2, 4, 3, 3), 3, "block_size must be even when there is more than one butterfly factor"),
        ((2, 24), (3, 6, 4, 4), 4, r"divisible by block_size \* 2\^\(m-1\) = 16"),
        ((), (1, 1, 1, 1), 1, "at least one dimension"),
    ],
)
def test_butterfly_errors(x_shape: tuple[int, ...], rot_shape: tuple[int, ...], b: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.butterfly(torch.randn(x_shape), torch.randn(rot_shape), b)


def test_butterfly_dtype_mismatch() -> None:
    with pytest.raises(TypeError, match="x and rotations must have the same dtype, got Float and Double"):
        ops.butterfly(torch.randn(2, 8), torch.randn(1, 2, 4, 4, dtype=torch.float64), 4)


def test_butterfly_backward_grad_shape() -> None:
    x, rot = torch.randn(2, 8), torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="grad must have the shape of x"):
        torch.ops.orthoft.butterfly_backward(torch.randn(3, 8), x, rot, 4)


@pytest.mark.cuda
def test_device_mismatch() -> None:
    if not orthoft.cuda_kernels_available():
        pytest.skip("orthoft was built without CUDA kernels")
    x, rot = torch.randn(2, 8, device="cuda"), torch.randn(1, 2, 4, 4)
    with pytest.raises((ValueError, RuntimeError), match=r"same device|Expected all tensors"):
        ops.butterfly(x, rot, 4)
