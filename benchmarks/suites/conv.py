"""Training step of one Conv2d layer on ResNet-50 shapes: orthoft's OFT/BOFT, PEFT's, the frozen conv
and the conv with a trained weight.

PEFT's OFT Conv2d changed in PEFT 0.22: it rotates the weight and calls the base conv, exact as orthoft's.
Before, it unfolded and folded the input, which sums overlapping patches and is not exact. Its label says
which of the two a run measured.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cases import Case, Settings, Step, Suite
from peft_support import PEFT_MISSING, peft_boft_skip, peft_oft_conv_is_exact, peft_version
from steps import module_step
from suites.adapters import adapted_layer

FROZEN = "nn.Conv2d (frozen)"
# The same conv with a trainable weight: forward, input gradient and weight gradient. Any method that
# rotates the weight needs these three convolutions, so this is its floor.
WEIGHT_GRADIENT = "nn.Conv2d, weight trained (floor of a rotated weight)"
OFT_BLOCK_SIZE = {"smoke": 8, "quick": 32, "full": 32}
BOFT_BLOCK_SIZE = {"smoke": 4, "quick": 8, "full": 8}
BUTTERFLY_FACTORS = {"smoke": [2], "quick": [1, 4], "full": [1, 4]}

# (in channels, out channels, kernel, height = width): a 3x3 of stage 1, a 3x3 of stage 3, a 1x1 reduction
SHAPES = {
    "smoke": [(8, 8, 3, 6)],
    "quick": [(64, 64, 3, 56)],
    "full": [(64, 64, 3, 56), (256, 256, 3, 14), (1024, 256, 1, 14)],
}


def shape_label(in_channels: int, out_channels: int, kernel: int, size: int, batch: int) -> str:
    return f"{kernel}x{kernel} {in_channels}->{out_channels} @ {size}x{size}, batch {batch}"


DEFAULT_BATCH = {"cpu": 8, "cuda": 32}


def _batch(settings: Settings) -> int:
    if settings.batch is not None:
        return settings.batch
    if settings.size == "smoke":
        return 2
    return DEFAULT_BATCH[settings.device.type]


def oft_label(block_size: int) -> str:
    return f"OFTConv2d b={block_size}"


def boft_label(block_size: int, factors: int) -> str:
    return f"BOFTConv2d b={block_size} m={factors}"


def unfolded_input_label(block_size: int) -> str:
    return f"OFT b={block_size}, unfolded input rotated (one weight product in backward)"


PEFT_OFT = "PEFT OFT"


def peft_oft_label(block_size: int) -> str:
    how = (
        "rotated weight, PEFT >= 0.22"
        if peft_oft_conv_is_exact()
        else "unfolded input, PEFT < 0.22: not exact"
    )
    return f"{PEFT_OFT} b={block_size} ({how})"


def peft_boft_label(block_size: int, factors: int) -> str:
    return f"PEFT BOFT b={block_size} m={factors}"


def _competitors(settings: Settings) -> list[tuple[str, dict[str, Any], str | None]]:
    """(label, spec, skip reason) of every competitor, the frozen baseline first."""
    oft_b, boft_b = OFT_BLOCK_SIZE[settings.size], BOFT_BLOCK_SIZE[settings.size]
    factors = BUTTERFLY_FACTORS[settings.size]
    peft_skip = None if peft_version() else PEFT_MISSING
    out: list[tuple[str, dict[str, Any], str | None]] = [(FROZEN, {"kind": "frozen"}, None)]
    out.append((WEIGHT_GRADIENT, {"kind": "weight_trained"}, None))
    out.append((oft_label(oft_b), {"kind": "oft", "block_size": oft_b}, None))
    out += [
        (boft_label(boft_b, m), {"kind": "boft", "block_size": boft_b, "factors": m}, None) for m in factors
    ]
    out.append((unfolded_input_label(oft_b), {"kind": "oft_unfolded_input", "block_size": oft_b}, None))
    out.append((peft_oft_label(oft_b), {"kind": "peft_oft", "block_size": oft_b}, peft_skip))
    out += [
        (
            peft_boft_label(boft_b, m),
            {"kind": "peft_boft", "block_size": boft_b, "factors": m},
            peft_boft_skip(m),
        )
        for m in factors
    ]
    return out


def cases(settings: Settings) -> list[Case]:
    dtype = settings.dtype or "float32"
    batch = _batch(settings)
    out = []
    for c_in, c_out, k, size in SHAPES[settings.size]:
        shape = shape_label(c_in, c_out, k, size, batch)
        for competitor, spec, skip in _competitors(settings):
            spec = {**spec, "in": c_in, "out": c_out, "kernel": k, "size": size, "batch": batch}
            if spec["kind"] == "oft_unfolded_input" and k == 1:
                skip = "a 1x1 kernel has nothing to unfold: OFTConv2d rotates the input channels there"
            out.append(Case("conv", shape, competitor, FROZEN, dtype, spec, skip))
    return out


def build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype, rotate: bool) -> Step:
    k = spec["kernel"]
    base = nn.Conv2d(spec["in"], spec["out"], k, padding=k // 2, device=device, dtype=dtype)
    x_shape = (spec["batch"], spec["in"], spec["size"], spec["size"])
    return module_step(adapted_layer(base, spec), x_shape, device, dtype)


SUITE = Suite(
    name="conv",
    title="conv: training step of one Conv2d layer (forward, y.backward(dy), zero grads)",
    ratio_header="÷ frozen nn.Conv2d",
    cases=cases,
    build=build,
)
