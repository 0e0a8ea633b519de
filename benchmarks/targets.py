"""The performance targets, checked against a run's medians: PASS, MISS (by how much) or NOT MEASURED."""

from __future__ import annotations

from dataclasses import dataclass

from outcomes import Result
from suites import block_diag, butterfly, cayley, layer


@dataclass(frozen=True)
class Where:
    device: str
    dtype: str
    suite: str
    shape: str


@dataclass(frozen=True)
class Target:
    """``orthoft_case`` takes at most ``limit`` times ``other`` (``at_most``), or ``other`` takes at
    least ``limit`` times ``orthoft_case`` (``orthoft_case`` is that much faster)."""

    where: Where
    orthoft_case: str
    other: str
    limit: float
    at_most: bool

    @property
    def description(self) -> str:
        if self.at_most:
            return f"{self.orthoft_case} within {self.limit:g}x of {self.other}"
        if self.limit == 1:
            return f"{self.orthoft_case} no slower than {self.other}"
        return f"{self.orthoft_case} at least {self.limit:g}x faster than {self.other}"


def _targets() -> list[Target]:
    cpu_layer = Where("cpu", "float32", "layer", layer.shape_label(1024, 2048))
    boft, oft = layer.boft_label(8, 4), layer.oft_label(32)
    targets = [
        Target(cpu_layer, boft, layer.FROZEN, 1.5, at_most=True),
        Target(cpu_layer, boft, layer.peft_boft_label(8, 1), 3.0, at_most=False),
        Target(cpu_layer, oft, layer.FROZEN, 1.2, at_most=True),
        Target(cpu_layer, oft, layer.peft_oft_label(32), 1.0, at_most=False),
    ]
    cpu_block_diag = Where("cpu", "float32", "block_diag", block_diag.shape_label(64, 16))
    targets.append(Target(cpu_block_diag, block_diag.ORTHOFT, block_diag.TORCH, 5.0, at_most=False))
    for d, b in [(32, 32), (256, 16)]:
        where = Where("cuda", "float32", "block_diag", block_diag.shape_label(d, b))
        targets.append(Target(where, block_diag.ORTHOFT, block_diag.TORCH, 10.0, at_most=False))
        targets.append(Target(where, block_diag.ORTHOFT, block_diag.ZEROS, 1.3, at_most=True))
    for n, b in [(4096, 16), (512, 64)]:
        where = Where("cuda", "float32", "cayley", cayley.shape_label(n, b))
        targets.append(Target(where, cayley.ORTHOFT_EXACT, cayley.SOLVE, 5.0, at_most=False))
    where = Where("cuda", "bfloat16", "butterfly", butterfly.shape_label(8192, 4096, 8, 4))
    targets.append(Target(where, butterfly.ORTHOFT, butterfly.FLOOR, 2.0, at_most=True))
    targets.append(Target(where, butterfly.ORTHOFT, butterfly.PEFT_WAY, 10.0, at_most=False))
    return targets


TARGETS = _targets()


def _find(results: list[Result], where: Where, competitor: str) -> Result | None:
    for r in results:
        c = r.case
        if (c.suite, c.shape, c.dtype, c.competitor) == (where.suite, where.shape, where.dtype, competitor):
            return r
    return None


def _verdict(target: Target, ours: float, other: float) -> str:
    if target.at_most:
        ratio = ours / other
        text = f"{ratio:.2f}x"
        miss = f", {100 * (ratio / target.limit - 1):.0f}% over" if ratio > target.limit else ""
    else:
        ratio = other / ours
        text = f"{ratio:.2f}x faster"
        miss = f", {100 * (1 - ratio / target.limit):.0f}% short" if ratio < target.limit else ""
    return f"{'MISS' if miss else 'PASS'}  {target.description}: {text}{miss}"


def check(results: list[Result], device: str) -> list[str]:
    """One line per target of this device."""
    lines = []
    for t in TARGETS:
        if t.where.device != device:
            continue
        context = f" ({t.where.dtype}, {t.where.shape})"
        ours, other = _find(results, t.where, t.orthoft_case), _find(results, t.where, t.other)
        if ours is None or other is None or ours.timing is None or other.timing is None:
            notes = [f"{r.case.competitor} {r.note}" for r in (ours, other) if r is not None and r.note]
            why = f": {'; '.join(notes)}" if notes else ""
            lines.append(f"NOT MEASURED  {t.description}{context}{why}")
            continue
        lines.append(_verdict(t, ours.timing.median, other.timing.median) + context)
    return lines
