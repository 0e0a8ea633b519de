"""The measured outcome of each case, and the ratios between cases of the same shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cases import Case
from timing import Timing


@dataclass
class Result:
    case: Case
    timing: Timing | None = None
    peak_bytes: int | None = None
    note: str | None = None  # why there is no timing: skipped or failed

    @property
    def median_seconds(self) -> float | None:
        return None if self.timing is None else self.timing.median

    def as_dict(self) -> dict[str, Any]:
        c = self.case
        return {
            "suite": c.suite,
            "shape": c.shape,
            "competitor": c.competitor,
            "baseline": c.baseline,
            "dtype": c.dtype,
            "spec": c.spec,
            "median_seconds": self.median_seconds,
            "step_seconds": None if self.timing is None else self.timing.step_seconds,
            "steps_per_repeat": None if self.timing is None else self.timing.inner,
            "peak_bytes": self.peak_bytes,
            "note": self.note,
        }


def baseline_of(result: Result, results: list[Result]) -> Result | None:
    c = result.case
    for other in results:
        o = other.case
        if (o.suite, o.shape, o.dtype, o.competitor) == (c.suite, c.shape, c.dtype, c.baseline):
            return other
    return None


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline
