"""``orthoft.ops.cayley``, exact and Neumann, against the autograd formulations BOFT and OFT use."""

from __future__ import annotations

from typing import Any

import torch

import orthoft
from cases import Case, Settings, Step, Suite
from steps import autograd_step, input_set_count, nbytes, randn, random_skew

NEUMANN_TERMS = 5
ORTHOFT_EXACT = "orthoft exact"
SOLVE = "torch.linalg.solve Cayley (autograd)"
ORTHOFT_NEUMANN = f"orthoft Neumann k={NEUMANN_TERMS}"
PEFT_NEUMANN = f"PEFT's bmm Neumann k={NEUMANN_TERMS} (autograd)"

SIZES = {
    "smoke": [(8, 4)],
    "quick": [(512, 16), (64, 64)],
    "full": [(4096, 16), (512, 64)],
}


def shape_label(count: int, block_size: int) -> str:
    return f"{count} x {block_size}x{block_size}"


def cases(settings: Settings) -> list[Case]:
    dtype = settings.dtype or "float32"
    out = []
    for n, b in SIZES[settings.size]:
        shape = shape_label(n, b)
        for kind, competitor, baseline in [
            ("orthoft_exact", ORTHOFT_EXACT, ORTHOFT_EXACT),
            ("solve", SOLVE, ORTHOFT_EXACT),
            ("orthoft_neumann", ORTHOFT_NEUMANN, ORTHOFT_NEUMANN),
            ("peft_neumann", PEFT_NEUMANN, ORTHOFT_NEUMANN),
        ]:
            spec = {"count": n, "block_size": b, "kind": kind}
            out.append(Case("cayley", shape, competitor, baseline, dtype, spec))
    return out


def solve_cayley(skew: torch.Tensor) -> torch.Tensor:
    """BOFT's ``cayley_batch``: ``(I - S) inv(I + S)`` by a batched solve."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def peft_neumann_cayley(skew: torch.Tensor, num_terms: int = NEUMANN_TERMS) -> torch.Tensor:
    """OFT's ``_cayley_batch`` series ``I + 2S + 2S^2 + ... + S^(k-1)`` with bmm, as PEFT writes it."""
    n, b, _ = skew.shape
    rotation = torch.eye(b, device=skew.device, dtype=skew.dtype).repeat(n, 1, 1)
    rotation.add_(skew, alpha=2.0)
    power = torch.bmm(skew, skew)
    rotation.add_(power, alpha=2.0)
    for _ in range(3, num_terms - 1):
        power = torch.bmm(power, skew)
        rotation.add_(power, alpha=2.0)
    return rotation.add_(torch.bmm(power, skew))


def build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype, rotate: bool) -> Step:
    n, b = spec["count"], spec["block_size"]
    forward = {
        "orthoft_exact": orthoft.ops.cayley,
        "solve": solve_cayley,
        "orthoft_neumann": lambda skew: orthoft.ops.cayley(skew, NEUMANN_TERMS),
        "peft_neumann": peft_neumann_cayley,
    }[spec["kind"]]
    count = input_set_count(2 * nbytes((n, b, b), dtype), rotate)
    skews = [(random_skew((n, b, b), device, dtype, requires_grad=True),) for _ in range(count)]
    grads = [randn((n, b, b), device, dtype) for _ in range(count)]
    return autograd_step(forward, skews, grads)


SUITE = Suite(
    name="cayley",
    title="cayley: skew (n, b, b) -> rotations, forward + backward",
    ratio_header="÷ orthoft (same formula: exact or Neumann)",
    cases=cases,
    build=build,
)
