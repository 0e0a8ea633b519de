"""The orthoft operators: thin wrappers over ``torch.ops.orthoft``.

Each works on CPU and CUDA tensors of float32, float64, float16 and bfloat16, is differentiable,
and runs under ``torch.compile(fullgraph=True)``. Invalid arguments raise ``ValueError`` or
``TypeError`` before the operator is called.
"""

from __future__ import annotations

import torch

from . import _checks, _library  # noqa: F401  (_library registers fake and autograd kernels)

__all__ = ["block_diag", "butterfly", "cayley"]

_raise = _checks.raise_error


def block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """Block-diagonal matrices ``(..., D*b, D*b)`` from blocks ``(..., D, b, b)``."""
    _checks.block_diag(_raise, blocks)
    return torch.ops.orthoft.block_diag.default(blocks)


def cayley(skew: torch.Tensor, num_neumann_terms: int = 0) -> torch.Tensor:
    """Rotations ``(..., b, b)`` from skew-symmetric matrices ``(..., b, b)``.

    ``num_neumann_terms=0`` is the exact Cayley transform ``(I - S) inv(I + S)``; ``k > 0`` is
    PEFT's truncated Neumann series ``I + 2S + 2S^2 + ... + S^(k-1)`` (the transpose convention
    of ``(I + S) inv(I - S)``, as PEFT computes it).
    """
    _checks.cayley(_raise, skew, num_neumann_terms)
    return torch.ops.orthoft.cayley.default(skew, num_neumann_terms)


def butterfly(x: torch.Tensor, rotations: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x @ R`` for BOFT's ``R = M_{m-1} @ ... @ M_0``, ``rotations`` of shape ``(m, N/b, b, b)``.

    ``M_i = P_i blockdiag(rotations[i]) P_i^T`` with ``P_i`` the butterfly permutation of factor ``i``
    (see ``orthoft.reference.butterfly_permutation``). No ``N x N`` matrix is formed.
    """
    _checks.butterfly(_raise, x, rotations, block_size)
    return torch.ops.orthoft.butterfly.default(x, rotations, block_size)
