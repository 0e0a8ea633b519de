"""``orthoft.ops.butterfly`` against PEFT's dense construction and the five-pass memory floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import orthoft
from cases import Case, Settings, Step, Suite
from peft_support import fast_block_diag, peft_block_diag
from steps import autograd_step, input_set_count, nbytes, randn

ORTHOFT = "orthoft.ops.butterfly"
PEFT_WAY = "PEFT's way: dense P, block-diag, x @ R (autograd)"
FLOOR = "memory floor: copy + add (5 passes over x)"

# (rows, features, block size, butterfly factors)
SIZES = {
    "smoke": {"cpu": [(64, 32, 4, 2)], "cuda": [(64, 32, 4, 2)]},
    "quick": {"cpu": [(2048, 1024, 8, 4)], "cuda": [(8192, 4096, 8, 4)]},
    "full": {"cpu": [(4096, 1024, 8, 4)], "cuda": [(8192, 4096, 8, 4)]},
}


def shape_label(rows: int, features: int, block_size: int, factors: int) -> str:
    return f"x {rows}x{features}, b={block_size}, m={factors}"


def default_dtype(settings: Settings) -> str:
    return settings.dtype or ("bfloat16" if settings.on_cuda else "float32")


def _sizes(settings: Settings) -> list[tuple[int, int, int, int]]:
    sizes = SIZES[settings.size][settings.device.type]
    if settings.tokens is None and settings.features is None:
        return sizes
    _, _, b, m = sizes[0]
    rows = settings.tokens or tuple(r for r, _, _, _ in sizes)
    features = settings.features or tuple(f for _, f, _, _ in sizes)
    return [(r, f, b, m) for f in features for r in rows]


def cases(settings: Settings) -> list[Case]:
    dtype = default_dtype(settings)
    out = []
    for rows, features, b, m in _sizes(settings):
        shape = shape_label(rows, features, b, m)
        spec = {"rows": rows, "features": features, "block_size": b, "factors": m}
        for kind, competitor in [("orthoft", ORTHOFT), ("peft", PEFT_WAY), ("floor", FLOOR)]:
            out.append(Case("butterfly", shape, competitor, ORTHOFT, dtype, {**spec, "kind": kind}))
    return out


def _permutation_matrices(
    features: int, b: int, m: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """PEFT's ``boft_P``: ``P_i[j, perm_i[j]] = 1`` for each factor, dense ``(m, N, N)``."""
    p = torch.zeros(m, features, features, device=device, dtype=dtype)
    rows = torch.arange(features, device=device)
    for i in range(m):
        p[i, rows, orthoft.reference.butterfly_permutation(features, b, i).to(device)] = 1
    return p


def _peft_way(permutations: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """PEFT's BOFT forward from the rotations on: its FastBlockDiag when prebuilt, else torch's."""
    fast = peft_block_diag() if fast_block_diag()[0] is not None else None

    def forward(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        if fast is not None:
            blocks = fast(rotations)
        else:
            blocks = torch.stack([torch.block_diag(*factor.unbind(0)) for factor in rotations])
        factors = torch.bmm(permutations, torch.bmm(blocks, permutations.mT))
        total = factors[0]
        for factor in factors[1:]:
            total = factor @ total
        return x @ total

    return forward


def _floor_step(inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> Step:
    y = torch.empty_like(inputs[0][0])
    dx = torch.empty_like(y)

    def step(i: int) -> None:
        x, grad = inputs[i % len(inputs)]
        y.copy_(x)  # forward: read x, write y
        torch.add(x, grad, out=dx)  # backward: read x and dy, write dx

    return step


def build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype, rotate: bool) -> Step:
    rows, features, b, m = spec["rows"], spec["features"], spec["block_size"], spec["factors"]
    count = input_set_count(2 * nbytes((rows, features), dtype), rotate)
    if spec["kind"] == "floor":
        shape = (rows, features)
        return _floor_step([(randn(shape, device, dtype), randn(shape, device, dtype)) for _ in range(count)])
    rotations = randn((m, features // b, b, b), device, dtype, requires_grad=True)
    inputs = [(randn((rows, features), device, dtype, requires_grad=True), rotations) for _ in range(count)]
    grads = [randn((rows, features), device, dtype) for _ in range(count)]
    if spec["kind"] == "orthoft":
        return autograd_step(lambda x, r: orthoft.ops.butterfly(x, r, b), inputs, grads)
    return autograd_step(_peft_way(_permutation_matrices(features, b, m, device, dtype)), inputs, grads)


SUITE = Suite(
    name="butterfly",
    title="butterfly: x @ R for BOFT's R = M_{m-1} ... M_0, forward + backward",
    ratio_header="÷ orthoft",
    cases=cases,
    build=build,
)
