"""What a benchmark run is made of: its settings, its cases and the suites that list and build them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# One forward+backward step; the argument picks which of the case's input sets to use.
Step = Callable[[int], None]

Size = Literal["smoke", "quick", "full"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Settings:
    """The choices of one run that decide which cases exist and how big they are."""

    device: torch.device
    size: Size
    dtype: str | None  # None: each suite's own default
    features: tuple[int, ...] | None = None
    tokens: tuple[int, ...] | None = None
    batch: int | None = None

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Case:
    """One competitor on one shape. ``spec`` is JSON-able: it is all ``Suite.build`` needs."""

    suite: str
    shape: str
    competitor: str
    baseline: str  # the competitor, on the same shape, that this case's ratios divide by
    dtype: str
    spec: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None  # why the case is not run


@dataclass(frozen=True)
class Suite:
    """A family of cases: how to list them for some settings and how to build one step."""

    name: str
    title: str
    ratio_header: str  # names the baseline of the ratio columns
    cases: Callable[[Settings], list[Case]]
    # (spec, device, dtype, rotate) -> step; rotate: several input sets so caches do not flatter
    build: Callable[[dict[str, Any], torch.device, torch.dtype, bool], Step]
