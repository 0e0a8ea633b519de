"""The performance targets, checked against one run: PASS, MISS, WITHIN NOISE or NOT MEASURED.

A time target compares two competitors of the same case from the same interleaved rounds. Its
figure is the ratio of their best round medians; its noise is the range of the per-round ratios.
It is PASS or MISS only if every round agrees (the whole range lies on one side of the limit),
otherwise WITHIN NOISE. Memory targets compare exact byte counts, so they have no noise band.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cases import Case, Size
from outcomes import Ratio, Result, find, memory_ratio, time_ratio
from suites import block_diag, butterfly, cayley, conv, layer, model
from suites import lycoris as lycoris_suite

Metric = Literal["time", "memory"]

PASS, MISS, NOISE, NOT_MEASURED = "PASS", "MISS", "WITHIN NOISE", "NOT MEASURED"


@dataclass(frozen=True)
class Where:
    device: str
    dtype: str
    suite: str
    shape: str


@dataclass(frozen=True)
class Target:
    """``at_most``: ``orthoft_case`` costs at most ``limit`` times ``other``. Otherwise ``other``
    takes at least ``limit`` times as long as ``orthoft_case`` (it is that much faster)."""

    where: Where
    orthoft_case: str
    other: str
    limit: float
    at_most: bool
    metric: Metric = "time"

    @property
    def description(self) -> str:
        ours, other, limit = self.orthoft_case, self.other, f"{self.limit:g}x"
        if self.metric == "memory":
            if self.limit == 1:
                return f"{ours} peak memory no larger than {other}'s"
            return f"{ours} peak memory within {limit} of {other}'s"
        if self.at_most and self.limit == 1:
            return f"{ours} no slower than {other}"
        if self.at_most:
            return f"{ours} within {limit} of {other}"
        if self.limit == 1:
            return f"{ours} faster than {other}"
        return f"{ours} at least {limit} faster than {other}"


def _cpu(suite: str, shape: str) -> Where:
    return Where("cpu", "float32", suite, shape)


def _cpu_block_diag(size: Size) -> list[Target]:
    out = []
    for d, b in block_diag.SIZES[size]:
        where = _cpu("block_diag", block_diag.shape_label(d, b))
        # 64 blocks of 16: many small blocks, where a dedicated kernel should win most.
        speedup = 5.0 if (d, b) == (64, 16) else 1.0
        out.append(Target(where, block_diag.ORTHOFT, block_diag.TORCH, speedup, at_most=False))
        if (d * b) ** 2 * 4 >= 16 * 2**20:  # float32 output of 16 MiB or more: the write dominates
            out.append(Target(where, block_diag.ORTHOFT, block_diag.ZEROS, 1.5, at_most=True))
    return out


def _cpu_cayley(size: Size) -> list[Target]:
    out = []
    for n, b in cayley.SIZES[size]:
        where = _cpu("cayley", cayley.shape_label(n, b))
        out.append(Target(where, cayley.ORTHOFT_NEUMANN, cayley.PEFT_NEUMANN, 1.0, at_most=True))
        out.append(Target(where, cayley.ORTHOFT_EXACT, cayley.SOLVE, 2.0, at_most=False))
    return out


def _cpu_layer(size: Size) -> list[Target]:
    where = _cpu("layer", layer.shape_label(1024, 2048))
    boft, oft = layer.boft_label(8, 4), layer.oft_label(32)
    out = [
        Target(where, boft, layer.FROZEN, 1.4, at_most=True),
        Target(where, boft, layer.peft_boft_label(8, 1), 3.0, at_most=False),
        Target(where, oft, layer.FROZEN, 1.2, at_most=True),
        Target(where, oft, layer.peft_oft_label(32), 1.0, at_most=True),
    ]
    # PEFT runs one butterfly factor on CPU, so only m = 1 has a PEFT counterpart here.
    boft_grid, oft_grid, _ = layer.COMPETITOR_GRID[size]
    pairs = [(layer.boft_label(b, m), layer.peft_boft_label(b, m)) for b, m in boft_grid if m == 1]
    pairs += [(layer.oft_label(b), layer.peft_oft_label(b)) for b in oft_grid]
    return out + [Target(where, ours, peft, 1.0, at_most=True, metric="memory") for ours, peft in pairs]


def _cpu_conv(size: Size) -> list[Target]:
    oft_b, boft_b = conv.OFT_BLOCK_SIZE[size], conv.BOFT_BLOCK_SIZE[size]
    factors = conv.BUTTERFLY_FACTORS[size]
    out = []
    for c_in, c_out, k, side in conv.SHAPES[size]:
        where = _cpu("conv", conv.shape_label(c_in, c_out, k, side, conv.DEFAULT_BATCH["cpu"]))
        for ours in [conv.oft_label(oft_b), *(conv.boft_label(boft_b, m) for m in factors)]:
            out.append(Target(where, ours, conv.FROZEN, 1.5, at_most=True))
        pairs = [(conv.oft_label(oft_b), conv.peft_oft_label(oft_b))]
        pairs.append((conv.boft_label(boft_b, 1), conv.peft_boft_label(boft_b, 1)))
        out += [Target(where, ours, peft, 1.0, at_most=True, metric="memory") for ours, peft in pairs]
    return out


def _cpu_model(size: Size) -> list[Target]:
    where = _cpu("model", model.shape_label(model.DECODERS[size]["cpu"]))
    boft = model.orthoft_boft_label(4)
    return [
        Target(where, model.ORTHOFT_OFT, model.PEFT_OFT, 1.0, at_most=True),
        Target(where, model.ORTHOFT_OFT, model.PEFT_OFT, 1.0, at_most=True, metric="memory"),
        Target(where, boft, model.PEFT_LORA, 1.1, at_most=True),
        Target(where, boft, model.PEFT_OFT, 1.15, at_most=True, metric="memory"),
    ]


def _cuda(size: Size) -> list[Target]:
    out = []
    for d, b in block_diag.SIZES[size]:
        where = Where("cuda", "float32", "block_diag", block_diag.shape_label(d, b))
        out.append(Target(where, block_diag.ORTHOFT, block_diag.TORCH, 10.0, at_most=False))
        if (d * b) ** 2 * 4 >= 4 * 2**20:  # below 4 MiB a launch costs more than the write
            out.append(Target(where, block_diag.ORTHOFT, block_diag.ZEROS, 1.3, at_most=True))
    for n, b in cayley.SIZES[size]:
        where = Where("cuda", "float32", "cayley", cayley.shape_label(n, b))
        out.append(Target(where, cayley.ORTHOFT_EXACT, cayley.SOLVE, 5.0, at_most=False))
    for rows, features, b, m in butterfly.SIZES[size]["cuda"]:
        where = Where("cuda", "bfloat16", "butterfly", butterfly.shape_label(rows, features, b, m))
        out.append(Target(where, butterfly.ORTHOFT, butterfly.FLOOR, 2.0, at_most=True))
        out.append(Target(where, butterfly.ORTHOFT, butterfly.PEFT_WAY, 10.0, at_most=False))
    where = Where("cuda", "bfloat16", "model", model.shape_label(model.DECODERS[size]["cuda"]))
    for ours in (model.ORTHOFT_OFT, model.orthoft_boft_label(4)):
        out.append(Target(where, ours, model.PEFT_LORA, 1.3, at_most=True))
    return out


def _lycoris(device: str, size: Size) -> list[Target]:
    """The output-side layers against LyCORIS's own modules in bypass mode (its fastest on CPU; on a GPU,
    its fused kernels): diag-OFT no slower, BOFT at least 2x faster."""
    diag, boft = lycoris_suite.BLOCK_SIZES[size]
    out = []
    for shape in (lycoris_suite.linear_shape(1024, 2048), lycoris_suite.unet_shape(size)):
        where = Where(device, "float32", "lycoris", shape)
        for algo, b, limit, at_most in (("diag-oft", diag, 1.0, True), ("boft", boft, 2.0, False)):
            ours, theirs = (
                lycoris_suite.orthoft_label(algo, b),
                lycoris_suite.lycoris_label(algo, b, "bypass"),
            )
            out.append(Target(where, ours, theirs, limit, at_most=at_most))
    return out


def targets_for(device: str, size: Size) -> list[Target]:
    """The targets of a run of ``size`` on ``device``, on the shapes that run measures. The smoke run only
    checks the harness: its shapes are too small to say anything, so it has none."""
    if size == "smoke":
        return []
    if device == "cuda":
        return _cuda(size) + _lycoris(device, size)
    makers = (_cpu_block_diag, _cpu_cayley, _cpu_layer, _cpu_conv, _cpu_model)
    return [t for make in makers for t in make(size)] + _lycoris(device, size)


def _ratio(target: Target, ours: Result, other: Result) -> Ratio | None:
    return memory_ratio(ours, other) if target.metric == "memory" else time_ratio(ours, other)


def verdict(target: Target, ratio: Ratio) -> str:
    """The line for one measured target; ``ratio`` is ``orthoft_case`` over ``other``."""
    limit = target.limit
    if target.at_most:
        value, low, high, unit = ratio.value, ratio.low, ratio.high, "x"
        passed, missed = high <= limit, low > limit
        shortfall = f"{100 * (value / limit - 1):.0f}% over"
    else:  # speed-ups: the other's time over ours
        value, low, high, unit = 1 / ratio.value, 1 / ratio.high, 1 / ratio.low, "x faster"
        passed, missed = low >= limit, high < limit
        shortfall = f"{100 * (1 - value / limit):.0f}% short"
    text = f"{value:.2f}{unit}"
    if low != high:
        text += f" (rounds {low:.2f}-{high:.2f}x)"
    if missed:
        return f"{MISS}  {target.description}: {text}, {shortfall}"
    return f"{PASS if passed else NOISE}  {target.description}: {text}"


def _not_measured(target: Target, ours: Result | None, other: Result | None) -> str:
    notes = [f"{r.case.competitor} {r.note}" for r in (ours, other) if r is not None and r.note]
    return f"{NOT_MEASURED}  {target.description}{': ' + '; '.join(notes) if notes else ''}"


def check(results: list[Result], device: str, size: Size) -> list[str]:
    """One line per target of this run. The full run lists every target, the measured and the not measured;
    a smaller run lists only those it measured."""
    lines = []
    for t in targets_for(device, size):
        like = Case(t.where.suite, t.where.shape, t.orthoft_case, t.orthoft_case, t.where.dtype)
        ours, other = find(results, like, t.orthoft_case), find(results, like, t.other)
        ratio = None if ours is None or other is None else _ratio(t, ours, other)
        if ratio is None and size != "full":
            continue
        line = _not_measured(t, ours, other) if ratio is None else verdict(t, ratio)
        lines.append(f"{line} ({t.where.dtype}, {t.where.shape})")
    return lines
