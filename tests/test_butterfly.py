from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from orthoft import ops, reference

from helpers import assert_close_rel, non_contiguous

# (block_size b, factors m, features N, leading dims of x)
CASES = [
    (1, 1, 5, (3,)),
    (3, 1, 9, (2, 2)),
    (2, 1, 8, (4,)),
    (2, 6, 64, (5,)),
    (4, 3, 32, (2, 3)),
    (4, 2, 24, (7,)),
    (6, 2, 24, (3,)),
    (8, 4, 128, (33,)),
    (8, 1, 64, (2, 1, 3)),
    (16, 2, 96, (9,)),
    (16, 5, 256, (3,)),
    (32, 1, 96, (4,)),
    (32, 3, 256, (5,)),
    (2, 6, 128, (2, 2)),
    (32, 6, 1024, (2,)),
]


def _rand(b: int, m: int, n: int, batch: tuple[int, ...], device: str, dtype: torch.dtype = torch.float64):
    x = torch.randn(*batch, n, dtype=dtype, device=device)
    rotations = torch.randn(m, n // b, b, b, dtype=dtype, device=device) / b**0.5
    return x, rotations


@pytest.mark.parametrize(("b", "m", "n", "batch"), CASES)
def test_forward_matches_reference_and_dense(
    b: int, m: int, n: int, batch: tuple[int, ...], device: str
) -> None:
    x, rotations = _rand(b, m, n, batch, device)
    out = ops.butterfly(x, rotations, b)
    torch.testing.assert_close(out, reference.butterfly(x, rotations, b), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, x @ reference.butterfly_matrix(rotations, b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("b", "m", "n", "batch"), CASES)
def test_backward_matches_reference_autograd(
    b: int, m: int, n: int, batch: tuple[int, ...], device: str
) -> None:
    x, rotations = _rand(b, m, n, batch, device)
    x.requires_grad_()
    rotations.requires_grad_()
    grad = torch.randn(*batch, n, dtype=torch.float64, device=device)
    got = torch.autograd.grad(ops.butterfly(x, rotations, b), (x, rotations), grad)
    want = torch.autograd.grad(x @ reference.butterfly_matrix(rotations, b), (x, rotations), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def _assert_matches_float64(
    b: int,
    m: int,
    n: int,
    batch: tuple[int, ...],
    dtype: torch.dtype,
    output_mask: tuple[bool, bool],
    device: str,
) -> None:
    """The forward and the gradients ``output_mask`` asks for, in ``dtype``, against the float64 reference;
    a gradient not asked for is empty."""
    x64, rot64 = _rand(b, m, n, batch, device)
    grad64 = torch.randn_like(x64)
    x, rotations, grad = x64.to(dtype), rot64.to(dtype), grad64.to(dtype)
    out = ops.butterfly(x, rotations, b)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rel(out, reference.butterfly(x64, rot64, b), dtype)
    got = torch.ops.orthoft.butterfly_backward(grad, x, rotations, b, list(output_mask))
    want = reference.butterfly_backward(grad64, x64, rot64, b)
    for needed, g, w in zip(output_mask, got, want, strict=True):
        if needed:
            assert g.dtype == dtype and g.shape == w.shape
            assert_close_rel(g, w, dtype)
        else:
            assert g.shape == (0,) and g.dtype == dtype


# One factor of blocks of 16 or more columns: (b, N, leading dims of x). Blocks up to 32 columns (256 with
# AVX-512) that fill whole register panels run through the CPU's block kernel (row counts that leave
# partial panels and tasks, and single blocks whose gradient splits its rows between threads), the others
# through BLAS.
WIDE_BLOCK_CASES = [
    (32, 32, (301,)),
    (128, 128, (3, 100)),
    (16, 64, (101,)),
    (24, 96, (3, 35)),
    (32, 128, (197,)),
    (48, 96, (7,)),
    (64, 128, (13,)),
    (96, 192, (45,)),
    (128, 512, (67,)),
    (256, 512, (9,)),
    (512, 1024, (5,)),
]


@pytest.mark.parametrize(("b", "n", "batch"), WIDE_BLOCK_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("output_mask", [(True, False), (False, True), (True, True)])
def test_one_factor_of_wide_blocks(
    b: int, n: int, batch: tuple[int, ...], dtype: torch.dtype, output_mask: tuple[bool, bool], device: str
) -> None:
    _assert_matches_float64(b, 1, n, batch, dtype, output_mask, device)


@pytest.mark.parametrize("b", [16, 64])
def test_one_factor_of_wide_blocks_non_contiguous(b: int, device: str) -> None:
    x, rotations = _rand(b, 1, 2 * b, (29,), device)
    grad = torch.randn_like(x)
    out = ops.butterfly(non_contiguous(x), rotations.mT.contiguous().mT, b)
    torch.testing.assert_close(out, reference.butterfly(x, rotations, b), rtol=1e-10, atol=1e-12)
    got = torch.ops.orthoft.butterfly_backward(
        non_contiguous(grad), non_contiguous(x), rotations, b, [True, True]
    )
    for g, w in zip(got, reference.butterfly_backward(grad, x, rotations, b), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


# Factors with enough rows (8 per chunk column; backward at least 384, 768 for one factor) that the CPU
# multiplies by the dense chunks of C = b * 2^(m-1) columns where its block kernels take C, and by two or
# more chunks together where C is narrower than their panels (16 float or 8 double columns, dividing N):
# (b, m, N, leading dims of x). C = 64 and 128 are taken with AVX-512 only; (8, 3, 64), (8, 2, 64, (130,))
# and (8, 1, 64, (130,)) take the chunks forward only, and the chunks of (8, 1, 24) cannot go together.
CHUNK_CASES = [
    (16, 4, 256, (1030,)),
    (4, 2, 16, (400,)),
    (8, 2, 64, (390,)),
    (2, 4, 96, (3, 130)),
    (16, 2, 128, (385,)),
    (4, 4, 64, (401,)),
    (8, 4, 128, (515,)),
    (8, 3, 64, (383,)),
    (8, 1, 64, (390,)),
    (8, 2, 64, (130,)),
    (8, 1, 64, (130,)),
    (4, 1, 32, (770,)),
    (1, 1, 32, (2, 400)),
    (2, 2, 48, (3, 130)),
    (8, 1, 24, (800,)),
]


@pytest.mark.parametrize(("b", "m", "n", "batch"), CHUNK_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("output_mask", [(True, False), (False, True), (True, True)])
def test_factors_by_their_chunks(
    b: int,
    m: int,
    n: int,
    batch: tuple[int, ...],
    dtype: torch.dtype,
    output_mask: tuple[bool, bool],
    device: str,
) -> None:
    _assert_matches_float64(b, m, n, batch, dtype, output_mask, device)


def test_many_rows_use_several_tiles(device: str) -> None:
    x, rotations = _rand(4, 3, 32, (257,), device)
    grad = torch.randn_like(x)
    got = torch.ops.orthoft.butterfly_backward(grad, x, rotations, 4, [True, True])
    want = reference.butterfly_backward(grad, x, rotations, 4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_non_contiguous_inputs(device: str) -> None:
    x, rotations = _rand(4, 3, 64, (6,), device)
    x_nc = non_contiguous(x)
    rot_nc = rotations.mT.contiguous().mT
    assert not rot_nc.is_contiguous()
    out = ops.butterfly(x_nc, rot_nc, 4)
    torch.testing.assert_close(out, reference.butterfly(x, rotations, 4), rtol=1e-10, atol=1e-12)
    grad = non_contiguous(torch.randn_like(x))
    got = torch.ops.orthoft.butterfly_backward(grad, x_nc, rot_nc, 4, [True, True])
    want = reference.butterfly_backward(grad, x, rotations, 4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_identity_rotations_give_x(device: str) -> None:
    x = torch.randn(10, 64, dtype=torch.float64, device=device)
    eye = torch.eye(8, dtype=torch.float64, device=device).expand(3, 8, 8, 8)
    torch.testing.assert_close(ops.butterfly(x, eye, 8), x, rtol=0, atol=1e-15)


def test_orthogonal_rotations_preserve_norms(device: str) -> None:
    a = torch.randn(4, 16, 8, 8, dtype=torch.float64, device=device)
    rotations = torch.linalg.qr(a).Q
    x = torch.randn(12, 128, dtype=torch.float64, device=device)
    torch.testing.assert_close(ops.butterfly(x, rotations, 8).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_float64(dtype: torch.dtype, device: str) -> None:
    x64, rot64 = _rand(8, 4, 256, (64,), device)
    x, rotations = x64.to(dtype), rot64.to(dtype)
    out = ops.butterfly(x, rotations, 8)
    assert out.dtype == dtype
    assert_close_rel(out, reference.butterfly(x.double(), rotations.double(), 8), dtype)
    grad = torch.randn_like(x64).to(dtype)
    got = torch.ops.orthoft.butterfly_backward(grad, x, rotations, 8, [True, True])
    want = reference.butterfly_backward(grad.double(), x.double(), rotations.double(), 8)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        assert_close_rel(g, w, dtype)


@pytest.mark.parametrize(("b", "m", "n", "batch"), CASES)
def test_float32_against_float64(b: int, m: int, n: int, batch: tuple[int, ...], device: str) -> None:
    # float32 runs other vector kernels than float64: twice the elements per vector.
    x64, rot64 = _rand(b, m, n, batch, device)
    grad64 = torch.randn_like(x64)
    x, rotations, grad = x64.float(), rot64.float(), grad64.float()
    assert_close_rel(ops.butterfly(x, rotations, b), reference.butterfly(x64, rot64, b), torch.float32)
    got = torch.ops.orthoft.butterfly_backward(grad, x, rotations, b, [True, True])
    want = reference.butterfly_backward(grad64, x64, rot64, b)
    for g, w in zip(got, want, strict=True):
        assert_close_rel(g, w, torch.float32)


def test_empty_rows(device: str) -> None:
    x, rotations = _rand(4, 2, 16, (0,), device)
    assert ops.butterfly(x, rotations, 4).shape == (0, 16)
    grad_x, grad_rot = torch.ops.orthoft.butterfly_backward(x, x, rotations, 4, [True, True])
    assert grad_x.shape == (0, 16)
    torch.testing.assert_close(grad_rot, torch.zeros_like(rotations), rtol=0, atol=0)


@pytest.mark.parametrize(("b", "m", "n"), [(4, 3, 32), (16, 1, 32), (64, 1, 128)])
def test_gradcheck(b: int, m: int, n: int, device: str) -> None:
    x, rotations = _rand(b, m, n, (3,), device)
    assert torch.autograd.gradcheck(
        lambda a, r: ops.butterfly(a, r, b), (x.requires_grad_(), rotations.requires_grad_())
    )


@pytest.mark.parametrize(("b", "m", "n"), [(4, 3, 32), (2, 1, 6), (16, 1, 32), (64, 1, 64)])
def test_opcheck(b: int, m: int, n: int, device: str) -> None:
    x, rotations = _rand(b, m, n, (3, 2), device, dtype=torch.float32)
    torch.library.opcheck(
        torch.ops.orthoft.butterfly.default, (x.requires_grad_(), rotations.requires_grad_(), b)
    )
    for output_mask in ([True, True], [True, False], [False, True]):
        args = (torch.randn_like(x), x.detach(), rotations.detach(), b, output_mask)
        torch.library.opcheck(torch.ops.orthoft.butterfly_backward.default, args)


@pytest.mark.parametrize(("b", "m", "n"), [(4, 3, 32), (8, 2, 64), (16, 1, 64), (3, 1, 9)])
@pytest.mark.parametrize("output_mask", [(True, False), (False, True), (True, True)])
def test_backward_computes_only_the_gradients_asked_for(
    b: int, m: int, n: int, output_mask: tuple[bool, bool], device: str
) -> None:
    x, rotations = _rand(b, m, n, (37,), device)
    grad = torch.randn_like(x)
    got = torch.ops.orthoft.butterfly_backward(grad, x, rotations, b, list(output_mask))
    want = reference.butterfly_backward(grad, x, rotations, b)
    for needed, g, w in zip(output_mask, got, want, strict=True):
        if needed:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
        else:
            assert g.shape == (0,) and g.dtype == w.dtype


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("x_grad", "rotations_grad"), [(True, False), (False, True), (True, True)])
def test_autograd_asks_only_for_the_needed_gradients(x_grad: bool, rotations_grad: bool, device: str) -> None:
    x, rotations = _rand(4, 3, 32, (5,), device)
    x.requires_grad_(x_grad)
    rotations.requires_grad_(rotations_grad)
    grad = torch.randn_like(x)
    out = ops.butterfly(x, rotations, 4)
    with _RecordOps() as recorded:
        out.backward(grad)
    masks = [args[4] for func, args in recorded.calls if func == torch.ops.orthoft.butterfly_backward.default]
    assert masks == [[x_grad, rotations_grad]]
    want_x, want_rotations = reference.butterfly_backward(grad, x.detach(), rotations.detach(), 4)
    for needed, got, want in ((x_grad, x.grad, want_x), (rotations_grad, rotations.grad, want_rotations)):
        if needed:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        else:
            assert got is None
