"""The measured outcome of each case, and the ratios between competitors of the same shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cases import Case
from memory import Memory
from timing import Timing


@dataclass
class Result:
    case: Case
    timing: Timing | None = None
    memory: Memory | None = None
    note: str | None = None  # why there is no timing: skipped or failed

    @property
    def median_seconds(self) -> float | None:
        """The best round's median time of one step."""
        return None if self.timing is None else self.timing.best

    @property
    def peak_bytes(self) -> int | None:
        return None if self.memory is None else self.memory.peak_bytes

    def as_dict(self) -> dict[str, Any]:
        c, t, m = self.case, self.timing, self.memory
        return {
            "suite": c.suite,
            "shape": c.shape,
            "competitor": c.competitor,
            "baseline": c.baseline,
            "dtype": c.dtype,
            "spec": c.spec,
            "median_seconds": self.median_seconds,
            "spread": None if t is None else t.spread,
            "round_seconds": None if t is None else t.rounds,
            "steps_per_repeat": None if t is None else t.inner,
            "peak_bytes": None if m is None else m.peak_bytes,
            "held_bytes": None if m is None else m.held_bytes,
            "note": self.note,
        }


@dataclass(frozen=True)
class Ratio:
    """``value``: best round over best round; ``low``/``high``: the range of the per-round ratios.

    ``low <= value <= high`` always holds, so a limit outside ``[low, high]`` is met or missed by
    every round and by the reported figure alike.
    """

    value: float
    low: float
    high: float


def find(results: list[Result], like: Case, competitor: str) -> Result | None:
    """The result of ``competitor`` on the suite, shape and dtype of ``like``."""
    for r in results:
        o = r.case
        if (o.suite, o.shape, o.dtype, o.competitor) == (like.suite, like.shape, like.dtype, competitor):
            return r
    return None


def baseline_of(result: Result, results: list[Result]) -> Result | None:
    return find(results, result.case, result.case.baseline)


def time_ratio(result: Result, other: Result) -> Ratio | None:
    """``result``'s time over ``other``'s, both from the same interleaved rounds."""
    if result.timing is None or other.timing is None:
        return None
    mine, theirs = result.timing.round_medians, other.timing.round_medians
    per_round = [a / b for a, b in zip(mine, theirs, strict=True) if b > 0]
    if not per_round or other.timing.best <= 0:
        return None
    return Ratio(result.timing.best / other.timing.best, min(per_round), max(per_round))


def memory_ratio(result: Result, other: Result) -> Ratio | None:
    """``result``'s step peak over ``other``'s; exact counts, so the range is the value itself."""
    if result.memory is None or other.memory is None or other.memory.peak_bytes <= 0:
        return None
    value = result.memory.peak_bytes / other.memory.peak_bytes
    return Ratio(value, value, value)
