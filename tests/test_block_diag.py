from __future__ import annotations

import pytest
import torch

from orthoft import ops, reference

from helpers import assert_close_rel, non_contiguous

SHAPES = [(1, 1, 1), (1, 2, 2), (4, 3, 3), (7, 16, 16), (3, 5, 4, 4), (2, 2, 3, 8, 8), (32, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape: tuple[int, ...], device: str) -> None:
    blocks = torch.randn(shape, dtype=torch.float64, device=device)
    out = ops.block_diag(blocks)
    torch.testing.assert_close(out, reference.block_diag(blocks), rtol=0, atol=0)
    flat = blocks.reshape(-1, *shape[-3:])
    first = torch.block_diag(*flat[0])
    torch.testing.assert_close(out.reshape(-1, *out.shape[-2:])[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_takes_the_diagonal_blocks(shape: tuple[int, ...], device: str) -> None:
    blocks = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    grad = torch.randn(ops.block_diag(blocks).shape, dtype=torch.float64, device=device)
    (got,) = torch.autograd.grad(ops.block_diag(blocks), blocks, grad)
    (want,) = torch.autograd.grad(reference.block_diag(blocks), blocks, grad)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_backward_operator_on_non_contiguous_grad(device: str) -> None:
    grad = non_contiguous(torch.randn(3, 24, 24, dtype=torch.float64, device=device))
    out = torch.ops.orthoft.block_diag_backward(grad, 6)
    torch.testing.assert_close(out, reference.block_diag_backward(grad, 6), rtol=0, atol=0)


def test_non_contiguous_blocks(device: str) -> None:
    blocks = torch.randn(5, 6, 6, dtype=torch.float64, device=device).mT
    torch.testing.assert_close(ops.block_diag(blocks), reference.block_diag(blocks), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_is_exact_copy(dtype: torch.dtype, device: str) -> None:
    blocks = torch.randn(6, 8, 8, device=device).to(dtype)
    out = ops.block_diag(blocks)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.block_diag(blocks), rtol=0, atol=0)
    assert_close_rel(out, reference.block_diag(blocks.double()), dtype)


def test_empty_batch(device: str) -> None:
    blocks = torch.randn(0, 3, 2, 2, device=device)
    assert ops.block_diag(blocks).shape == (0, 6, 6)


def test_gradcheck(device: str) -> None:
    blocks = torch.randn(2, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(ops.block_diag, (blocks,))


def test_opcheck(device: str) -> None:
    blocks = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.orthoft.block_diag.default, (blocks,))
    torch.library.opcheck(
        torch.ops.orthoft.block_diag_backward.default, (torch.randn(2, 12, 12, device=device), 3)
    )
