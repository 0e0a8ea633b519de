"""Fake (meta) and autograd kernels of the orthoft operators, and the CUDA fallback.

The schemas and the CPU/CUDA kernels are registered by the compiled module ``orthoft._C``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _C, _build_config, _checks, reference  # noqa: F401  (_C registers the operators)

_OPS = ("block_diag", "block_diag_backward", "cayley", "cayley_backward", "butterfly", "butterfly_backward")

_check = _checks.torch_check


# Fake kernels: shapes only, for torch.compile and FakeTensor tracing, after the kernels' own checks.
@torch.library.register_fake("orthoft::block_diag")
def _block_diag_fake(blocks: torch.Tensor) -> torch.Tensor:
    _checks.block_diag(_check, blocks)
    *batch, d, b, _ = blocks.shape
    return blocks.new_empty((*batch, d * b, d * b))


@torch.library.register_fake("orthoft::block_diag_backward")
def _block_diag_backward_fake(grad: torch.Tensor, block_size: int) -> torch.Tensor:
    _checks.block_diag_backward(_check, grad, block_size)
    *batch, n, _ = grad.shape
    return grad.new_empty((*batch, n // block_size, block_size, block_size))


@torch.library.register_fake("orthoft::cayley")
def _cayley_fake(skew: torch.Tensor, num_neumann_terms: int = 0) -> torch.Tensor:
    _checks.cayley(_check, skew, num_neumann_terms)
    return torch.empty_like(skew, memory_format=torch.contiguous_format)


@torch.library.register_fake("orthoft::cayley_backward")
def _cayley_backward_fake(
    grad: torch.Tensor, skew: torch.Tensor, rotation: torch.Tensor, num_neumann_terms: int
) -> torch.Tensor:
    _checks.cayley_backward(_check, grad, skew, rotation, num_neumann_terms)
    return torch.empty_like(skew, memory_format=torch.contiguous_format)


@torch.library.register_fake("orthoft::butterfly")
def _butterfly_fake(x: torch.Tensor, rotations: torch.Tensor, block_size: int) -> torch.Tensor:
    _checks.butterfly(_check, x, rotations, block_size)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gradients_like(
    inputs: tuple[torch.Tensor, torch.Tensor], output_mask: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A backward operator's two gradients: contiguous, like its inputs, or empty where not asked for."""
    first, second = (
        torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)
        for t, needed in zip(inputs, output_mask, strict=True)
    )
    return first, second


@torch.library.register_fake("orthoft::butterfly_backward")
def _butterfly_backward_fake(
    grad: torch.Tensor, x: torch.Tensor, rotations: torch.Tensor, block_size: int, output_mask: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.butterfly_backward(_check, grad, x, rotations, block_size, output_mask)
    return _gradients_like((x, rotations), output_mask)


@torch.library.register_fake("orthoft::channel_blocks")
def _channel_blocks_fake(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    _checks.channel_blocks(_check, x, blocks)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("orthoft::channel_blocks_backward")
def _channel_blocks_backward_fake(
    grad: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, output_mask: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.channel_blocks_backward(_check, grad, x, blocks, output_mask)
    return _gradients_like((x, blocks), output_mask)


# Autograd: each backward is an operator of its own, asked only for the gradients autograd needs.
def _block_diag_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.block_size = inputs[0].shape[-1]


def _block_diag_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    return torch.ops.orthoft.block_diag_backward.default(grad, ctx.block_size)


def _cayley_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    skew, num_neumann_terms = inputs
    ctx.num_neumann_terms = num_neumann_terms
    ctx.save_for_backward(skew, output)


def _cayley_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    skew, rotation = ctx.saved_tensors
    return torch.ops.orthoft.cayley_backward.default(grad, skew, rotation, ctx.num_neumann_terms), None


def _butterfly_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, rotations, block_size = inputs
    ctx.block_size = block_size
    ctx.save_for_backward(x, rotations)


def _butterfly_backward(
    ctx: Any, grad: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    x, rotations = ctx.saved_tensors
    need_x, need_rotations = ctx.needs_input_grad[:2]
    grad_x, grad_rotations = torch.ops.orthoft.butterfly_backward.default(
        grad, x, rotations, ctx.block_size, [need_x, need_rotations]
    )
    return (grad_x if need_x else None), (grad_rotations if need_rotations else None), None


def _channel_blocks_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _channel_blocks_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    x, blocks = ctx.saved_tensors
    need_x, need_blocks = ctx.needs_input_grad[:2]
    grad_x, grad_blocks = torch.ops.orthoft.channel_blocks_backward.default(
        grad, x, blocks, [need_x, need_blocks]
    )
    return (grad_x if need_x else None), (grad_blocks if need_blocks else None)


torch.library.register_autograd("orthoft::block_diag", _block_diag_backward, setup_context=_block_diag_setup)
torch.library.register_autograd("orthoft::cayley", _cayley_backward, setup_context=_cayley_setup)
torch.library.register_autograd("orthoft::butterfly", _butterfly_backward, setup_context=_butterfly_setup)
torch.library.register_autograd(
    "orthoft::channel_blocks", _channel_blocks_backward, setup_context=_channel_blocks_setup
)


# A build without CUDA kernels still computes the same functions on CUDA tensors, with the reference.
@functools.cache
def _warn_no_cuda_kernels() -> None:
    warnings.warn(
        "orthoft was built without CUDA kernels; CUDA tensors use the slower pure PyTorch "
        "reference implementation. Install a CUDA wheel or rebuild with ORTHOFT_CUDA=1.",
        stacklevel=4,
    )


def _fallback_kernel(reference_fn: Callable[..., Any]) -> Callable[..., Any]:
    """The kernel that computes one operator with its reference: contiguous outputs, as the kernels give."""

    def kernel(*args: Any) -> Any:
        _warn_no_cuda_kernels()
        out = reference_fn(*args)
        if isinstance(out, tuple):
            return tuple(t.contiguous() for t in out)
        return out.contiguous()

    return kernel


CUDA_FALLBACKS = {name: _fallback_kernel(getattr(reference, name)) for name in _OPS}

if not _build_config.with_cuda:
    for _name, _kernel in CUDA_FALLBACKS.items():
        torch.library.register_kernel(f"orthoft::{_name}", "cuda", _kernel)
