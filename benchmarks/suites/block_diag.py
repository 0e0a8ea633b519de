"""``orthoft.ops.block_diag`` against ``torch.block_diag``, PEFT's FastBlockDiag and a write floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import orthoft
from cases import Case, Settings, Step, Suite
from peft_support import fast_block_diag, peft_block_diag
from steps import autograd_step, input_set_count, nbytes, randn

ORTHOFT = "orthoft.ops.block_diag"
TORCH = "torch.block_diag (autograd)"
PEFT = "PEFT FastBlockDiag"
ZEROS = "torch.zeros of the output (write floor)"

SIZES = {
    "smoke": [(4, 4)],
    "quick": [(64, 16), (32, 32)],
    "full": [(32, 32), (64, 16), (256, 16), (1024, 4)],
}


def shape_label(num_blocks: int, block_size: int) -> str:
    return f"{num_blocks} blocks of {block_size}x{block_size}"


def cases(settings: Settings) -> list[Case]:
    dtype = settings.dtype or "float32"
    _, peft_skip = fast_block_diag()
    out = []
    for d, b in SIZES[settings.size]:
        shape = shape_label(d, b)
        spec = {"num_blocks": d, "block_size": b}
        for kind, competitor, skip in [
            ("orthoft", ORTHOFT, None),
            ("torch", TORCH, None),
            ("peft", PEFT, peft_skip or None),
            ("zeros", ZEROS, None),
        ]:
            out.append(Case("block_diag", shape, competitor, ORTHOFT, dtype, {**spec, "kind": kind}, skip))
    return out


def _torch_block_diag(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks.unbind(0))


def _forward(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "orthoft":
        return orthoft.ops.block_diag
    if kind == "torch":
        return _torch_block_diag
    fast_block_diag = peft_block_diag()

    def peft_forward(blocks: torch.Tensor) -> torch.Tensor:
        return fast_block_diag(blocks.unsqueeze(0))[0]

    return peft_forward


def build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype, rotate: bool) -> Step:
    d, b = spec["num_blocks"], spec["block_size"]
    n = d * b
    if spec["kind"] == "zeros":
        return lambda i: torch.zeros(n, n, device=device, dtype=dtype)
    count = input_set_count(nbytes((n, n), dtype), rotate)
    blocks = [(randn((d, b, b), device, dtype, requires_grad=True),) for _ in range(count)]
    grads = [randn((n, n), device, dtype) for _ in range(count)]
    return autograd_step(_forward(spec["kind"]), blocks, grads)


SUITE = Suite(
    name="block_diag",
    title="block_diag: blocks (D, b, b) -> (D*b, D*b), forward + backward",
    ratio_header="÷ orthoft",
    cases=cases,
    build=build,
)
