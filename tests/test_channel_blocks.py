"""``orthoft::channel_blocks``: each position's channels of ``x`` ``(..., F, P)`` times a block-diagonal
matrix, and its backward, against the float64 reference.

The CPU kernels take float32 and float64: their panels run along the positions, with the last positions
(fewer than a vector) through padded copies, and the blocks' gradient in passes over segments of
positions. The cases cover every remainder of the positions modulo AVX-512's, AVX2's and SSE's float
and double widths, chunk sizes that are and are not multiples of the panels' rows, positions split into
several segments, and few and many chunks (the backward goes chunk by chunk where there are enough).
"""

from __future__ import annotations

import pytest
import torch

from orthoft import reference

from helpers import assert_close_rel, non_contiguous

# (leading dims, chunks D, chunk size C, positions P). C of two or more vectors takes the gradient by
# columns; 48 and 24 leave a group of fewer vectors than a tile's at one width or another.
CASES = [
    ((3,), 8, 8, 49),
    ((2, 5), 3, 32, 196),
    ((1,), 2, 64, 3136),
    ((4,), 4, 3, 7),
    ((2,), 1, 32, 16),
    ((), 5, 1, 64),
    ((8,), 32, 32, 196),
    ((2,), 6, 6, 13),
    ((3,), 16, 16, 33),
    ((2,), 1, 5, 2100),
    ((5,), 40, 4, 1),
    ((3,), 2, 48, 37),
    ((2,), 3, 24, 50),
]
OP = torch.ops.orthoft.channel_blocks.default
BACKWARD = torch.ops.orthoft.channel_blocks_backward.default


def _rand(
    leading: tuple[int, ...], d: int, c: int, p: int, dtype: torch.dtype = torch.float64, device: str = "cpu"
):
    x = torch.randn(*leading, d * c, p, dtype=dtype, device=device)
    blocks = torch.randn(d, c, c, dtype=dtype, device=device) / c**0.5
    return x, blocks


@pytest.mark.parametrize(("leading", "d", "c", "p"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(
    leading: tuple[int, ...], d: int, c: int, p: int, dtype: torch.dtype, device: str
) -> None:
    x, blocks = _rand(leading, d, c, p, device=device)
    grad = torch.randn_like(x)
    want = reference.channel_blocks(x, blocks)
    want_x, want_blocks = reference.channel_blocks_backward(grad, x, blocks)
    # Dense in float64: the reference itself against a plain per-position product.
    dense = torch.block_diag(*blocks)
    torch.testing.assert_close(want, torch.einsum("...fp,fg->...gp", x, dense))
    out = OP(x.to(dtype), blocks.to(dtype))
    got_x, got_blocks = BACKWARD(grad.to(dtype), x.to(dtype), blocks.to(dtype), [True, True])
    for got, ref in ((out, want), (got_x, want_x), (got_blocks, want_blocks)):
        assert got.dtype == dtype and got.shape == ref.shape and got.is_contiguous()
        assert_close_rel(got, ref, dtype)


@pytest.mark.parametrize(
    ("leading", "d", "c", "p"), [((3,), 8, 8, 49), ((2,), 1, 32, 20), ((8,), 32, 32, 196)]
)
@pytest.mark.parametrize("output_mask", [(True, False), (False, True), (True, True), (False, False)])
def test_backward_computes_only_the_gradients_asked_for(
    leading: tuple[int, ...], d: int, c: int, p: int, output_mask: tuple[bool, bool], device: str
) -> None:
    x, blocks = _rand(leading, d, c, p, device=device)
    grad = torch.randn_like(x)
    got = BACKWARD(grad, x, blocks, list(output_mask))
    want = reference.channel_blocks_backward(grad, x, blocks)
    for needed, g, w in zip(output_mask, got, want, strict=True):
        if needed:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
        else:
            assert g.shape == (0,) and g.dtype == w.dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_against_float64(dtype: torch.dtype, device: str) -> None:
    x, blocks = _rand((4,), 6, 16, 50, device=device)
    grad = torch.randn_like(x)
    assert_close_rel(OP(x.to(dtype), blocks.to(dtype)), reference.channel_blocks(x, blocks), dtype)
    got = BACKWARD(grad.to(dtype), x.to(dtype), blocks.to(dtype), [True, True])
    for g, w in zip(got, reference.channel_blocks_backward(grad, x, blocks), strict=True):
        assert g.dtype == dtype
        assert_close_rel(g, w, dtype)


def test_non_contiguous_inputs(device: str) -> None:
    x, blocks = _rand((3,), 4, 8, 30, device=device)
    grad = torch.randn_like(x)
    blocks_t = blocks.mT.contiguous().mT  # the same values, transposed in memory
    assert not blocks_t.is_contiguous()
    torch.testing.assert_close(OP(non_contiguous(x), blocks_t), reference.channel_blocks(x, blocks))
    got = BACKWARD(non_contiguous(grad), non_contiguous(x), blocks_t, [True, True])
    for g, w in zip(got, reference.channel_blocks_backward(grad, x, blocks), strict=True):
        torch.testing.assert_close(g, w)


def test_empty_inputs(device: str) -> None:
    for shape in ((0, 16, 5), (2, 16, 0)):
        x = torch.randn(shape, dtype=torch.float64, device=device)
        blocks = torch.randn(2, 8, 8, dtype=torch.float64, device=device)
        assert OP(x, blocks).shape == shape
        grad_x, grad_blocks = BACKWARD(x, x, blocks, [True, True])
        assert grad_x.shape == shape
        torch.testing.assert_close(grad_blocks, torch.zeros_like(blocks), rtol=0, atol=0)


def test_identity_blocks_give_x(device: str) -> None:
    x = torch.randn(2, 24, 37, device=device)
    eye = torch.eye(8, device=device).expand(3, 8, 8).contiguous()
    torch.testing.assert_close(OP(x, eye), x, rtol=0, atol=0)


def test_gradcheck(device: str) -> None:
    x, blocks = _rand((2,), 3, 4, 21, device=device)
    assert torch.autograd.gradcheck(OP, (x.requires_grad_(), blocks.requires_grad_()))


@pytest.mark.parametrize(("leading", "d", "c", "p"), [((3,), 4, 8, 21), ((2, 2), 2, 16, 16), ((), 1, 4, 5)])
def test_opcheck(leading: tuple[int, ...], d: int, c: int, p: int, device: str) -> None:
    x, blocks = _rand(leading, d, c, p, dtype=torch.float32, device=device)
    torch.library.opcheck(OP, (x.requires_grad_(), blocks.requires_grad_()))
    for output_mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(BACKWARD, (torch.randn_like(x), x.detach(), blocks.detach(), output_mask))
