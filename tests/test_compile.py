"""Every operator under torch.compile(fullgraph=True), forward and backward, without graph breaks."""

from __future__ import annotations

import torch

from orthoft import ops, reference

from helpers import random_skew


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


def test_block_diag(device: str) -> None:
    blocks = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    out = _compiled(lambda b: ops.block_diag(b).square().sum())(blocks)
    (grad,) = torch.autograd.grad(out, blocks)
    torch.testing.assert_close(out, reference.block_diag(blocks).square().sum())
    torch.testing.assert_close(grad, 2 * blocks.detach())


def test_cayley(device: str) -> None:
    skew = random_skew(3, 6, 6, scale=0.2, dtype=torch.float32, device=device).requires_grad_()
    weight = torch.randn(3, 6, 6, device=device)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return (ops.cayley(s) * weight).sum() + (ops.cayley(s, 5) * weight).sum()

    got = torch.autograd.grad(_compiled(loss)(skew), skew)[0]
    want = torch.autograd.grad(
        (reference.cayley(skew) * weight).sum() + (reference.cayley(skew, 5) * weight).sum(), skew
    )[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_butterfly_in_a_layer_like_graph(device: str) -> None:
    x = torch.randn(5, 32, device=device, requires_grad=True)
    params = torch.randn(3, 8, 4, 4, device=device, requires_grad=True)
    weight = torch.randn(16, 32, device=device)

    def step(x: torch.Tensor, p: torch.Tensor, cayley, butterfly) -> torch.Tensor:
        rotations = cayley((0.1 * (p - p.mT)).flatten(0, 1)).view_as(p)
        return (butterfly(x, rotations, 4) @ weight.T).square().mean()

    compiled = _compiled(lambda a, p: step(a, p, ops.cayley, ops.butterfly))
    got_loss = compiled(x, params)
    got = torch.autograd.grad(got_loss, (x, params))
    want_loss = step(x, params, reference.cayley, reference.butterfly)
    want = torch.autograd.grad(want_loss, (x, params))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_butterfly_dynamic_batch(device: str) -> None:
    rotations = torch.randn(2, 4, 4, 4, device=device)
    compiled = torch.compile(lambda a: ops.butterfly(a, rotations, 4), fullgraph=True, dynamic=True)
    for rows in (3, 7, 11):
        x = torch.randn(rows, 16, device=device)
        torch.testing.assert_close(compiled(x), reference.butterfly(x, rotations, 4), rtol=1e-5, atol=1e-5)


def test_channel_blocks(device: str) -> None:
    x = torch.randn(3, 32, 21, device=device, requires_grad=True)
    blocks = torch.randn(4, 8, 8, device=device, requires_grad=True)
    weight = torch.randn_like(x)
    op = torch.ops.orthoft.channel_blocks.default
    got = torch.autograd.grad(_compiled(lambda a, b: (op(a, b) * weight).sum())(x, blocks), (x, blocks))
    want = torch.autograd.grad((reference.channel_blocks(x, blocks) * weight).sum(), (x, blocks))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
