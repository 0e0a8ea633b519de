"""Argument checks of the orthoft operators, written once for two callers.

``orthoft.ops`` runs them with :func:`raise_error` before calling an operator, so bad arguments raise
``ValueError`` or ``TypeError`` naming the operator, the argument, the value and what is valid. The
fake kernels in ``orthoft._library`` run them with :func:`torch_check`, so tracing (``torch.compile``,
FakeTensor) fails where the compiled kernel would, and a condition on a symbolic size becomes a
runtime assertion. The compiled kernels repeat the checks with the same messages (``cpp/checks.h``),
for direct calls of ``torch.ops.orthoft``; they can only raise ``RuntimeError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Check = Callable[[Any, type[Exception], Callable[[], str]], None]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_FACTORS = 30
MAX_NEUMANN_TERMS = 2**31 - 2


def raise_error(ok: Any, error: type[Exception], message: Callable[[], str]) -> None:
    if not ok:
        raise error(message())


def torch_check(ok: Any, error: type[Exception], message: Callable[[], str]) -> None:
    torch._check(ok, message)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _dtype(check: Check, t: torch.Tensor, op: str, arg: str) -> None:
    check(
        t.dtype in FLOAT_DTYPES,
        TypeError,
        lambda: f"orthoft.ops.{op}: {arg} must be float32, float64, float16 or bfloat16, got {t.dtype}",
    )


def _same(check: Check, a: torch.Tensor, arg_a: str, b: torch.Tensor, arg_b: str, op: str) -> None:
    check(
        a.dtype == b.dtype,
        TypeError,
        lambda: (
            f"orthoft.ops.{op}: {arg_a} and {arg_b} must have the same dtype, got {a.dtype} and {b.dtype}"
        ),
    )
    check(
        a.device == b.device,
        ValueError,
        lambda: (
            f"orthoft.ops.{op}: {arg_a} and {arg_b} must be on the same device, got {a.device} and {b.device}"
        ),
    )


def _square_blocks(check: Check, t: torch.Tensor, op: str, arg: str, min_dim: int) -> None:
    check(
        t.dim() >= min_dim,
        ValueError,
        lambda: f"orthoft.ops.{op}: {arg} must have at least {min_dim} dimensions, got shape {_shape(t)}",
    )
    check(
        t.shape[-1] == t.shape[-2] and t.shape[-1] > 0,
        ValueError,
        lambda: (
            f"orthoft.ops.{op}: {arg} must hold non-empty square blocks in its last two dimensions, "
            f"got shape {_shape(t)}"
        ),
    )


def _gradient_of_x(
    check: Check, grad: torch.Tensor, x: torch.Tensor, output_mask: Sequence[bool], op: str
) -> None:
    """A backward operator's ``grad`` (the gradient of its forward's output, shaped like ``x``) and its
    two ``output_mask`` flags."""
    _same(check, grad, "grad", x, "x", op)
    check(
        grad.shape == x.shape,
        ValueError,
        lambda: f"orthoft.ops.{op}: grad must have the shape of x {_shape(x)}, got {_shape(grad)}",
    )
    check(
        len(output_mask) == 2,
        ValueError,
        lambda: f"orthoft.ops.{op}: output_mask must hold two flags, got {len(output_mask)}",
    )


def block_diag(check: Check, blocks: torch.Tensor) -> None:
    _dtype(check, blocks, "block_diag", "blocks")
    _square_blocks(check, blocks, "block_diag", "blocks", 3)


def block_diag_backward(check: Check, grad: torch.Tensor, block_size: int) -> None:
    _dtype(check, grad, "block_diag_backward", "grad")
    _square_blocks(check, grad, "block_diag_backward", "grad", 2)
    n = grad.shape[-1]
    check(
        block_size > 0 and n % block_size == 0,
        ValueError,
        lambda: (
            f"orthoft.ops.block_diag_backward: block_size must be a positive divisor of {n}, got {block_size}"
        ),
    )


def cayley(check: Check, skew: torch.Tensor, num_neumann_terms: int) -> None:
    _dtype(check, skew, "cayley", "skew")
    _square_blocks(check, skew, "cayley", "skew", 2)
    check(
        0 <= num_neumann_terms <= MAX_NEUMANN_TERMS,
        ValueError,
        lambda: (
            "orthoft.ops.cayley: num_neumann_terms must be 0 (exact) or a positive number of series terms "
            f"below 2^31 - 1, got {num_neumann_terms}"
        ),
    )


def cayley_backward(
    check: Check, grad: torch.Tensor, skew: torch.Tensor, rotation: torch.Tensor, num_neumann_terms: int
) -> None:
    cayley(check, skew, num_neumann_terms)
    _same(check, grad, "grad", skew, "skew", "cayley_backward")
    _same(check, rotation, "rotation", skew, "skew", "cayley_backward")
    check(
        grad.shape == skew.shape and rotation.shape == skew.shape,
        ValueError,
        lambda: (
            "orthoft.ops.cayley_backward: grad, skew and rotation must have the same shape, got "
            f"{_shape(grad)}, {_shape(skew)} and {_shape(rotation)}"
        ),
    )


def butterfly(check: Check, x: torch.Tensor, rotations: torch.Tensor, block_size: int) -> None:
    op = "orthoft.ops.butterfly"
    _dtype(check, x, "butterfly", "x")
    _same(check, x, "x", rotations, "rotations", "butterfly")
    check(x.dim() >= 1, ValueError, lambda: f"{op}: x must have at least one dimension, got a scalar")
    check(
        rotations.dim() == 4,
        ValueError,
        lambda: f"{op}: rotations must have shape (m, N/b, b, b), got {_shape(rotations)}",
    )
    n, m = x.shape[-1], rotations.shape[0]
    check(
        block_size > 0 and n % block_size == 0,
        ValueError,
        lambda: (
            f"{op}: block_size must be a positive divisor of the last dimension of x ({n}), got {block_size}"
        ),
    )
    d = n // block_size
    check(
        rotations.shape[1:] == (d, block_size, block_size),
        ValueError,
        lambda: (
            f"{op}: rotations must have shape (m, {d}, {block_size}, {block_size}) for x with last "
            f"dimension {n} and block_size {block_size}, got {_shape(rotations)}"
        ),
    )
    check(
        1 <= m <= MAX_FACTORS,
        ValueError,
        lambda: (
            f"{op}: rotations must hold between 1 and {MAX_FACTORS} butterfly factors in its first "
            f"dimension, got {m}"
        ),
    )
    if m > 1:
        check(
            block_size % 2 == 0,
            ValueError,
            lambda: (
                f"{op}: block_size must be even when there is more than one butterfly factor, got "
                f"block_size {block_size} with {m} factors"
            ),
        )
        chunk = block_size * 2 ** (m - 1)
        check(
            n % chunk == 0,
            ValueError,
            lambda: (
                f"{op}: the last dimension of x ({n}) must be divisible by block_size * 2^(m-1) = {chunk} "
                f"for block_size {block_size} and {m} factors"
            ),
        )


def butterfly_backward(
    check: Check,
    grad: torch.Tensor,
    x: torch.Tensor,
    rotations: torch.Tensor,
    block_size: int,
    output_mask: Sequence[bool],
) -> None:
    butterfly(check, x, rotations, block_size)
    _gradient_of_x(check, grad, x, output_mask, "butterfly_backward")


def channel_blocks(check: Check, x: torch.Tensor, blocks: torch.Tensor) -> None:
    op = "orthoft.ops.channel_blocks"
    _dtype(check, x, "channel_blocks", "x")
    _same(check, x, "x", blocks, "blocks", "channel_blocks")
    check(x.dim() >= 2, ValueError, lambda: f"{op}: x must have shape (..., F, P), got {_shape(x)}")
    check(
        blocks.dim() == 3, ValueError, lambda: f"{op}: blocks must have shape (D, C, C), got {_shape(blocks)}"
    )
    _square_blocks(check, blocks, "channel_blocks", "blocks", 3)
    f = x.shape[-2]
    check(
        blocks.shape[0] * blocks.shape[1] == f,
        ValueError,
        lambda: (
            f"{op}: blocks (D, C, C) must split the F = {f} channels of x into D chunks of C (D * C = F), "
            f"got blocks of shape {_shape(blocks)}"
        ),
    )


def channel_blocks_backward(
    check: Check, grad: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, output_mask: Sequence[bool]
) -> None:
    channel_blocks(check, x, blocks)
    _gradient_of_x(check, grad, x, output_mask, "channel_blocks_backward")
