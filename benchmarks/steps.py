"""Building blocks of the measured steps: random inputs, input-set rotation, forward+backward."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from cases import Step

# Enough distinct input bytes to push earlier sets out of an L2 (GPU) or L3 (CPU) cache.
_CACHE_FLUSH_BYTES = 128 * 2**20
_MAX_INPUT_SETS = 32


def input_set_count(bytes_per_set: int, rotate: bool) -> int:
    """How many input sets a case cycles through: one without rotation, else enough to defeat caches."""
    if not rotate:
        return 1
    return max(2, min(_MAX_INPUT_SETS, math.ceil(_CACHE_FLUSH_BYTES / max(bytes_per_set, 1))))


def randn(
    shape: Sequence[int], device: torch.device, dtype: torch.dtype, requires_grad: bool = False
) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)


def random_skew(
    shape: Sequence[int], device: torch.device, dtype: torch.dtype, requires_grad: bool = False
) -> torch.Tensor:
    """Skew-symmetric blocks with entries of order ``1 / b``, the size trained rotations stay near."""
    a = torch.randn(*shape, device=device, dtype=torch.float32) / shape[-1]
    return (a - a.mT).to(dtype).requires_grad_(requires_grad)


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def autograd_step(
    forward: Callable[..., torch.Tensor],
    input_sets: Sequence[Sequence[torch.Tensor]],
    output_grads: Sequence[torch.Tensor],
    parameters: Sequence[torch.Tensor] = (),
) -> Step:
    """Forward on input set ``i % len``, backward with a random output gradient, then zero grads."""

    def step(i: int) -> None:
        k = i % len(input_sets)
        inputs = input_sets[k]
        forward(*inputs).backward(output_grads[k])
        for t in (*inputs, *parameters):
            t.grad = None

    return step


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def perturb_trainable(module: nn.Module) -> None:
    """Move adapters off their identity init, so that no kernel can shortcut zeros."""
    for p in trainable(module):
        p.add_(torch.randn_like(p), alpha=0.01)


def module_step(module: nn.Module, x_shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Step:
    """Training step of a layer inside a network: gradients for the input and the trainable parameters."""
    perturb_trainable(module)
    x = randn(x_shape, device, dtype, requires_grad=True)
    with torch.no_grad():
        grad = torch.randn_like(module(x))
    return autograd_step(module, [(x,)], [grad], trainable(module))
