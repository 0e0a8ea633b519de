"""Bad input gets a clear error, never a crash or a wrong answer.

The wrappers in ``orthoft.ops`` raise ``ValueError``/``TypeError`` before calling an operator; the
compiled kernels (direct calls of ``torch.ops.orthoft``) and the fake kernels (tracing) refuse the same
input with the same message as a ``RuntimeError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import orthoft
from orthoft import ops


def _refused_everywhere(
    wrapper: Callable[..., Any] | None, op: Any, args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    """The wrapper raises ``error``; the kernel and the fake kernel raise a RuntimeError; all match."""
    if wrapper is not None:
        with pytest.raises(error, match=match):
            wrapper(*args)
    with pytest.raises(RuntimeError, match=match):
        op(*args)
    fake_mode = FakeTensorMode()
    fake_args = tuple(fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with fake_mode, pytest.raises(RuntimeError, match=match):
        op(*fake_args)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((4, 4), "at least 3 dimensions"), ((2, 3, 4), "square blocks"), ((2, 0, 0), "non-empty square")],
)
def test_block_diag_shapes(shape: tuple[int, ...], match: str) -> None:
    _refused_everywhere(
        ops.block_diag, torch.ops.orthoft.block_diag.default, (torch.randn(shape),), ValueError, match
    )


def test_block_diag_backward_block_size() -> None:
    _refused_everywhere(
        None,
        torch.ops.orthoft.block_diag_backward.default,
        (torch.randn(12, 12), 5),
        ValueError,
        "block_size must be a positive divisor of 12, got 5",
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtypes(dtype: torch.dtype) -> None:
    match = "float32, float64, float16 or bfloat16, got"
    cases = [
        (ops.block_diag, torch.ops.orthoft.block_diag.default, (torch.ones(2, 3, 3, dtype=dtype),)),
        (ops.cayley, torch.ops.orthoft.cayley.default, (torch.ones(2, 3, 3, dtype=dtype), 0)),
        (
            ops.butterfly,
            torch.ops.orthoft.butterfly.default,
            (torch.ones(2, 8, dtype=dtype), torch.ones(1, 2, 4, 4, dtype=dtype), 4),
        ),
    ]
    for wrapper, op, args in cases:
        _refused_everywhere(wrapper, op, args, TypeError, match)
    with pytest.raises(TypeError, match=rf"x must be float32, float64, float16 or bfloat16, got {dtype}"):
        ops.butterfly(*cases[2][2])


@pytest.mark.parametrize(
    ("shape", "terms", "match"),
    [
        ((4,), 0, "at least 2 dimensions"),
        ((2, 3, 4), 0, "square blocks"),
        (
            (2, 3, 3),
            -1,
            r"num_neumann_terms must be 0 \(exact\) or a positive number of series terms .*got -1",
        ),
        ((2, 3, 3), 2**31 - 1, r"below 2\^31 - 1, got 2147483647"),
    ],
)
def test_cayley_errors(shape: tuple[int, ...], terms: int, match: str) -> None:
    _refused_everywhere(
        ops.cayley, torch.ops.orthoft.cayley.default, (torch.randn(shape), terms), ValueError, match
    )


def test_cayley_backward_shape_mismatch() -> None:
    s = torch.randn(2, 3, 3)
    _refused_everywhere(
        None,
        torch.ops.orthoft.cayley_backward.default,
        (torch.randn(2, 4, 4), s, s, 0),
        ValueError,
        "same shape",
    )


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
    args = (torch.randn(x_shape), torch.randn(rot_shape), b)
    _refused_everywhere(ops.butterfly, torch.ops.orthoft.butterfly.default, args, ValueError, match)


def test_butterfly_dtype_mismatch() -> None:
    x, rot = torch.randn(2, 8), torch.randn(1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(
        TypeError, match=r"x and rotations must have the same dtype, got torch\.float32 and torch\.float64"
    ):
        ops.butterfly(x, rot, 4)
    _refused_everywhere(None, torch.ops.orthoft.butterfly.default, (x, rot, 4), TypeError, "same dtype")


def test_butterfly_backward_grad_shape() -> None:
    x, rot = torch.randn(2, 8), torch.randn(1, 2, 4, 4)
    args = (torch.randn(3, 8), x, rot, 4, [True, True])
    op = torch.ops.orthoft.butterfly_backward.default
    _refused_everywhere(None, op, args, ValueError, "grad must have the shape of x")


@pytest.mark.parametrize("fullgraph", [False, True])
def test_errors_hold_under_torch_compile(fullgraph: bool) -> None:
    """A wrong block size is refused with the same message when the wrapper is compiled."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r: ops.butterfly(x, r, 4), fullgraph=fullgraph)
    x, rot = torch.randn(2, 8), torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(compiled(x, rot), ops.butterfly(x, rot, 4))
    message = (
        "orthoft.ops.butterfly: block_size must be a positive divisor of the last dimension of x (10), got 4"
    )
    # Dynamo reports an exception raised while tracing a fullgraph as its own error, with the message.
    error = Exception if fullgraph else ValueError
    with pytest.raises(error, match=re.escape(message)):
        compiled(torch.randn(2, 10), torch.randn(1, 2, 4, 4))


def test_fake_kernel_refuses_while_tracing() -> None:
    """The operator itself, traced, fails on a bad block size instead of rounding it."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda g: torch.ops.orthoft.block_diag_backward(g, 5), fullgraph=True)
    with pytest.raises(Exception, match="block_size must be a positive divisor of 12, got 5"):
        compiled(torch.randn(12, 12))


@pytest.mark.cuda
def test_device_mismatch() -> None:
    if not orthoft.cuda_kernels_available():
        pytest.skip("orthoft was built without CUDA kernels")
    x, rot = torch.randn(2, 8, device="cuda"), torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"x and rotations must be on the same device, got cuda:0 and cpu"):
        ops.butterfly(x, rot, 4)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.orthoft.butterfly(x, rot, 4)


@pytest.mark.parametrize(
    ("x_shape", "blocks_shape", "match"),
    [
        ((24,), (3, 8, 8), r"x must have shape \(\.\.\., F, P\), got"),
        ((2, 24, 5), (24, 1), r"blocks must have shape \(D, C, C\), got"),
        ((2, 24, 5), (3, 8, 4), "non-empty square blocks"),
        ((2, 24, 5), (2, 8, 8), r"split the F = 24 channels of x into D chunks of C \(D \* C = F\)"),
    ],
)
def test_channel_blocks_shapes(x_shape: tuple[int, ...], blocks_shape: tuple[int, ...], match: str) -> None:
    args = (torch.randn(x_shape), torch.randn(blocks_shape))
    _refused_everywhere(None, torch.ops.orthoft.channel_blocks.default, args, ValueError, match)


def test_channel_blocks_dtypes_and_grad_shape() -> None:
    x, blocks = torch.randn(2, 16, 5), torch.randn(2, 8, 8)
    op, backward = torch.ops.orthoft.channel_blocks.default, torch.ops.orthoft.channel_blocks_backward.default
    _refused_everywhere(None, op, (x, blocks.double()), TypeError, "x and blocks must have the same dtype")
    _refused_everywhere(None, op, (x.long(), blocks.long()), TypeError, "x must be float32, float64, float16")
    args = (torch.randn(2, 16, 6), x, blocks, [True, True])
    _refused_everywhere(None, backward, args, ValueError, "grad must have the shape of x")
