"""The outputs of a run: markdown tables, the raw numbers as JSON, and bar charts of the ratios."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cases import Suite
from environment import Environment
from outcomes import Ratio, Result, baseline_of, memory_ratio, time_ratio

METHOD = (
    "Times: the competitors of a shape are timed in interleaved rounds (A B C A B C ...); in each round "
    "every competitor runs a few repeats of one step (forward, backward with a random output gradient, "
    "the optimizer step where there is one, zero grads) after warm-up. Reported: the best round's "
    "median, the spread (worst round median over the best, minus 1) and each ratio over the best round "
    "medians, with the range of the ratios of the single rounds. On CPU glibc makes no fresh mappings "
    "and keeps freed memory, so that after warm-up no competitor's step pays page faults. "
    "Memory: live bytes of tensor storages "
    "(CUDA: the caching allocator's counters; CPU: every allocation and free torch's allocator reports "
    "to the profiler, summed in time order). 'peak' is the measured step's live peak above what the "
    "case holds before it ('held': weights, adapters, inputs, optimizer state), after a warm-up step; "
    "memory ratios are over the peaks."
)


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _ratio_text(ratio: Ratio | None) -> str:
    if ratio is None:
        return ""
    if ratio.low == ratio.high:
        return f"{ratio.value:.2f}x"
    return f"{ratio.value:.2f}x ({ratio.low:.2f}-{ratio.high:.2f})"


def _mib(nbytes: int | None) -> str:
    return "" if nbytes is None else _number(nbytes / 2**20)


def suite_table(suite: Suite, results: list[Result]) -> list[str]:
    ratio = suite.ratio_header
    header = (
        f"| shape | competitor | dtype | best round ms | spread | time {ratio} (rounds) "
        f"| peak MiB | held MiB | peak {ratio} |"
    )
    lines = [f"## {suite.title}", "", header, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c = r.case
        if r.timing is None:
            lines.append(f"| {c.shape} | {c.competitor} | {c.dtype} | {r.note} | | | | | |")
            continue
        base = baseline_of(r, results)
        cells = [
            c.shape,
            c.competitor,
            c.dtype,
            _number(r.timing.best * 1e3),
            f"{100 * r.timing.spread:.0f}%",
            _ratio_text(None if base is None else time_ratio(r, base)),
            _mib(r.peak_bytes),
            _mib(None if r.memory is None else r.memory.held_bytes),
            _ratio_text(None if base is None else memory_ratio(r, base)),
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return [*lines, ""]


def markdown(
    env: Environment,
    suites: list[Suite],
    results: list[Result],
    target_lines: list[str],
    extra: Sequence[str] = (),  # sections after the targets
) -> str:
    lines = ["# orthoft benchmarks", "", *(f"- {line}" for line in env.header_lines()), "", METHOD, ""]
    for suite in suites:
        lines += suite_table(suite, [r for r in results if r.case.suite == suite.name])
    if target_lines:
        lines += ["## Targets", "", *(f"- {line}" for line in target_lines), ""]
    return "\n".join([*lines, *extra])


def write_json(
    path: Path, env: Environment, results: list[Result], target_lines: list[str], **extra: Any
) -> None:
    data = {
        "environment": env.as_dict(),
        "results": [r.as_dict() for r in results],
        "targets": target_lines,
        **extra,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


def _bars(ax: Axes, labels: list[str], ratios: list[Ratio], title: str) -> None:
    """Horizontal bars of ratios on a log axis; error bars span the per-round range."""
    ys = list(range(len(labels)))
    values = [r.value for r in ratios]
    errors = [[r.value - r.low for r in ratios], [r.high - r.value for r in ratios]]
    colors = ["tab:gray" if abs(v - 1) < 1e-9 else "tab:blue" if v < 1 else "tab:orange" for v in values]
    ax.barh(ys, values, xerr=errors, color=colors, capsize=2, height=0.7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    formatter = ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    ax.xaxis.set_major_formatter(formatter)
    # Minor tick labels help within a decade or so and collide beyond.
    span = max(r.high for r in ratios) / min(r.low for r in ratios)
    ax.xaxis.set_minor_formatter(formatter if span < 8 else ticker.NullFormatter())
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    for y, r in zip(ys, ratios, strict=True):  # the value right of its error bar
        label = f"{r.value:.2f}x"
        ax.annotate(label, (r.high, y), (4, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", axis="x", alpha=0.3)


def _labelled(rows: list[tuple[Result, Result]], measure: Any) -> tuple[list[str], list[Ratio]]:
    pairs = [(r.case.competitor, measure(r, base)) for r, base in rows]
    kept = [(label, ratio) for label, ratio in pairs if ratio is not None and ratio.value > 0]  # log axes
    return [label for label, _ in kept], [ratio for _, ratio in kept]


Panel = tuple[str, str, list[tuple[Result, Result]]]


def _panels(suites: list[Suite], results: list[Result]) -> list[Panel]:
    """(suite and shape, ratio header, [(result, its baseline)]) for each shape with a measured baseline."""
    out = []
    for suite in suites:
        measured = [r for r in results if r.case.suite == suite.name and r.timing is not None]
        for shape in dict.fromkeys(r.case.shape for r in measured):
            pairs = [(r, baseline_of(r, results)) for r in measured if r.case.shape == shape]
            rows = [(r, base) for r, base in pairs if base is not None and base.timing is not None]
            if rows:
                out.append((f"{suite.name}, {shape}", suite.ratio_header, rows))
    return out


def write_plot(path: Path, env: Environment, suites: list[Suite], results: list[Result]) -> None:
    """One row of bar charts per suite and shape: time and peak memory over the baseline's."""
    panels = _panels(suites, results)
    if not panels:
        return
    heights = [1.2 + 0.28 * len(rows) for _, _, rows in panels]
    fig = Figure(figsize=(14, 1 + sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend: files only, no display
    axes = fig.subplots(len(panels), 2, squeeze=False, gridspec_kw={"height_ratios": heights})
    for (time_ax, memory_ax), (where, over, rows) in zip(axes, panels, strict=True):
        _bars(time_ax, *_labelled(rows, time_ratio), f"{where}: time {over}")
        labels, peaks = _labelled(rows, memory_ratio)
        if peaks:
            _bars(memory_ax, labels, peaks, f"peak memory {over}")
        else:
            memory_ax.set_axis_off()
    fig.suptitle("\n".join(env.header_lines()[:5]), fontsize=8, x=0.01, ha="left")
    fig.savefig(path, dpi=100)
