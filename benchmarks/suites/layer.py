"""Training step of one Linear layer: orthoft's OFT/BOFT against PEFT's OFT/BOFT/LoRA and the frozen layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cases import Case, Settings, Step, Suite
from peft_support import PEFT_MISSING, peft_boft_skip, peft_version
from steps import module_step
from suites.adapters import adapted_layer

FROZEN = "nn.Linear (frozen)"

# ((BOFT block size, butterfly factors) pairs, OFT block sizes, LoRA ranks) per size
COMPETITOR_GRID: dict[str, tuple[list[tuple[int, int]], list[int], list[int]]] = {
    "smoke": ([(4, 2)], [16], [8]),
    "quick": ([(8, 1), (8, 4)], [32], [8]),
    "full": ([(b, m) for b in (4, 8, 16) for m in (1, 2, 4)], [16, 32, 64], [8, 32]),
}


def _default_sizes(settings: Settings) -> tuple[list[int], list[int]]:
    """(features, tokens): the full grid on CUDA, one shape on CPU."""
    if settings.size == "smoke":
        return [64], [32]
    if settings.on_cuda:
        return [1024, 4096], [2048, 4096, 8192, 16384]
    return [1024], [2048]


def shape_label(features: int, tokens: int) -> str:
    return f"in=out={features}, {tokens} tokens"


def boft_label(block_size: int, factors: int) -> str:
    return f"BOFTLinear b={block_size} m={factors}"


def oft_label(block_size: int) -> str:
    return f"OFTLinear b={block_size}"


def peft_boft_label(block_size: int, factors: int) -> str:
    return f"PEFT BOFT b={block_size} m={factors}"


def peft_oft_label(block_size: int) -> str:
    return f"PEFT OFT b={block_size}"


def _competitors(settings: Settings) -> list[tuple[str, dict[str, Any], str | None]]:
    """(label, spec, skip reason) of every competitor, the frozen baseline first."""
    boft, oft, lora = COMPETITOR_GRID[settings.size]
    peft_skip = None if peft_version() else PEFT_MISSING
    out: list[tuple[str, dict[str, Any], str | None]] = [(FROZEN, {"kind": "frozen"}, None)]
    out += [(boft_label(b, m), {"kind": "boft", "block_size": b, "factors": m}, None) for b, m in boft]
    out += [(oft_label(b), {"kind": "oft", "block_size": b}, None) for b in oft]
    out += [
        (peft_boft_label(b, m), {"kind": "peft_boft", "block_size": b, "factors": m}, peft_boft_skip(m))
        for b, m in boft
    ]
    out += [(peft_oft_label(b), {"kind": "peft_oft", "block_size": b}, peft_skip) for b in oft]
    out += [(f"PEFT LoRA r={r}", {"kind": "peft_lora", "rank": r}, peft_skip) for r in lora]
    return out


def cases(settings: Settings) -> list[Case]:
    dtype = settings.dtype or "float32"
    default_features, default_tokens = _default_sizes(settings)
    out = []
    for features in settings.features or default_features:
        for tokens in settings.tokens or default_tokens:
            shape = shape_label(features, tokens)
            for competitor, spec, skip in _competitors(settings):
                spec = {**spec, "features": features, "tokens": tokens}
                out.append(Case("layer", shape, competitor, FROZEN, dtype, spec, skip))
    return out


def build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype, rotate: bool) -> Step:
    # One input set: a layer's weights are reused every step in training, so caches are fair game.
    features, tokens = spec["features"], spec["tokens"]
    base = nn.Linear(features, features, device=device, dtype=dtype)
    return module_step(adapted_layer(base, spec), (tokens, features), device, dtype)


SUITE = Suite(
    name="layer",
    title="layer: training step of one Linear layer (forward, y.backward(dy), zero grads)",
    ratio_header="÷ frozen nn.Linear",
    cases=cases,
    build=build,
)
