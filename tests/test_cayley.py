from __future__ import annotations

import pytest
import torch

from orthoft import ops, reference

from helpers import assert_close_rel, non_contiguous, random_skew

TERMS = [0, 1, 2, 3, 4, 5, 8]
SHAPES = [
    (1, 1, 1),
    (3, 2, 2),
    (5, 4, 4),
    (2, 3, 8, 8),
    (4, 16, 16),
    (3, 32, 32),
    (2, 33, 33),
    (2, 64, 64),
    (1, 80, 80),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("terms", TERMS)
def test_forward_matches_reference(shape: tuple[int, ...], terms: int, device: str) -> None:
    skew = random_skew(*shape, scale=0.3 / shape[-1] ** 0.5, device=device)
    out = ops.cayley(skew, terms)
    torch.testing.assert_close(out, reference.cayley(skew, terms), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 2, 2), (3, 6, 6), (2, 2, 16, 16), (2, 64, 64)])
def test_exact_is_orthogonal_and_matches_peft_solve(shape: tuple[int, ...], device: str) -> None:
    skew = random_skew(*shape, scale=2.0, device=device)
    r = ops.cayley(skew)
    eye = torch.eye(shape[-1], dtype=r.dtype, device=device)
    torch.testing.assert_close(r @ r.mT, eye.expand_as(r), rtol=0, atol=1e-10)
    # PEFT: torch.linalg.solve(I + S, I - S, left=False)
    peft = torch.linalg.solve(eye + skew, eye - skew, left=False)
    torch.testing.assert_close(r, peft, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("shape", [(3, 2, 2), (2, 3, 5, 5), (4, 16, 16), (3, 32, 32), (2, 40, 40)])
def test_backward_matches_reference_autograd(shape: tuple[int, ...], terms: int, device: str) -> None:
    skew = random_skew(*shape, scale=0.3 / shape[-1] ** 0.5, device=device).requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64, device=device)
    (got,) = torch.autograd.grad(ops.cayley(skew, terms), skew, grad)
    want_out = reference.cayley(skew, terms)
    if not want_out.requires_grad:  # one term: R = I
        torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=0)
        return
    (want,) = torch.autograd.grad(want_out, skew, grad)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("terms", [0, 5])
def test_non_contiguous_input(terms: int, device: str) -> None:
    skew = non_contiguous(random_skew(3, 6, 6, scale=0.2, device=device))
    torch.testing.assert_close(ops.cayley(skew, terms), reference.cayley(skew, terms), rtol=1e-10, atol=1e-12)
    grad = non_contiguous(torch.randn(3, 6, 6, dtype=torch.float64, device=device))
    rot = ops.cayley(skew, terms)
    got = torch.ops.orthoft.cayley_backward(grad, skew, rot, terms)
    torch.testing.assert_close(got, reference.cayley_backward(grad, skew, rot, terms), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("terms", [0, 5])
def test_low_precision_against_float64(dtype: torch.dtype, terms: int, device: str) -> None:
    skew64 = random_skew(64, 16, 16, scale=0.05, device=device)
    skew = skew64.to(dtype)
    out = ops.cayley(skew, terms)
    assert out.dtype == dtype
    assert_close_rel(out, reference.cayley(skew.double(), terms), dtype)
    grad = torch.randn_like(skew64)
    low = torch.ops.orthoft.cayley_backward(grad.to(dtype), skew, out, terms)
    ref = reference.cayley_backward(grad, skew.double(), reference.cayley(skew.double(), terms), terms)
    assert_close_rel(low, ref, dtype)


def test_empty_batch(device: str) -> None:
    skew = torch.randn(0, 4, 4, device=device)
    assert ops.cayley(skew).shape == (0, 4, 4)


@pytest.mark.parametrize("terms", TERMS)
def test_gradcheck(terms: int, device: str) -> None:
    skew = random_skew(2, 5, 5, scale=0.3, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: ops.cayley(s, terms), (skew,))


@pytest.mark.parametrize("terms", [0, 5])
def test_opcheck(terms: int, device: str) -> None:
    skew = random_skew(3, 4, 4, scale=0.3, dtype=torch.float32, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.orthoft.cayley.default, (skew, terms))
    rot = ops.cayley(skew.detach(), terms)
    args = (torch.randn_like(rot), skew.detach(), rot, terms)
    torch.library.opcheck(torch.ops.orthoft.cayley_backward.default, args)


@pytest.mark.parametrize("b", [3, 65, 96])
@pytest.mark.parametrize("terms", [0, 5])
def test_block_sizes_off_the_fast_path(b: int, terms: int, device: str) -> None:
    """b = 3 (its square does not divide a CUDA block of threads; it crashed on the GPU) and b > 64 (the
    CUDA kernels hand it to the batched-matmul path), forward and backward against the reference."""
    skew = random_skew(4, b, b, scale=0.3 / b**0.5, device=device)
    out = ops.cayley(skew, terms)
    torch.testing.assert_close(out, reference.cayley(skew, terms), rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(skew)
    got = torch.ops.orthoft.cayley_backward(grad, skew, out, terms)
    torch.testing.assert_close(got, reference.cayley_backward(grad, skew, out, terms), rtol=1e-9, atol=1e-11)
    low = ops.cayley(skew.float(), terms)
    assert_close_rel(low, reference.cayley(skew, terms), torch.float32)
