"""The outputs of a run: markdown tables, the raw numbers as JSON, and a PNG plot of the ratios."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib import colormaps, ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cases import Suite
from environment import Environment
from outcomes import Result, baseline_of, ratio

METHOD = (
    "Times: median over repeats of one step (forward, backward with a random output gradient, "
    "zero grads) after warm-up; a repeat runs the step enough times back to back to last a few "
    "milliseconds (CUDA: timed by CUDA events) and is divided by that count. Operator cases rotate "
    "several random input sets so that caches do not flatter. Peak memory: the increase, at the step's "
    "peak, over the process before the case was built (CUDA: max_memory_allocated) or over an idle "
    "process (CPU: peak RSS of a fresh process that runs the one case); it includes inputs and weights."
)


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _ratio_text(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def suite_table(suite: Suite, results: list[Result]) -> list[str]:
    header = (
        f"| shape | competitor | dtype | median ms | time {suite.ratio_header} "
        f"| peak MiB | memory {suite.ratio_header} |"
    )
    lines = [f"## {suite.title}", "", header, "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        c = r.case
        if r.timing is None:
            lines.append(f"| {c.shape} | {c.competitor} | {c.dtype} | {r.note} | | | |")
            continue
        base = baseline_of(r, results)
        base_time = None if base is None else base.median_seconds
        base_peak = None if base is None else base.peak_bytes
        peak_mib = None if r.peak_bytes is None else r.peak_bytes / 2**20
        cells = [
            c.shape,
            c.competitor,
            c.dtype,
            _number(r.timing.median * 1e3),
            _ratio_text(ratio(r.median_seconds, base_time)),
            _number(peak_mib),
            _ratio_text(ratio(r.peak_bytes, base_peak)),
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return [*lines, ""]


def markdown(env: Environment, suites: list[Suite], results: list[Result], target_lines: list[str]) -> str:
    lines = ["# orthoft benchmarks", "", *(f"- {line}" for line in env.header_lines()), "", METHOD, ""]
    for suite in suites:
        lines += suite_table(suite, [r for r in results if r.case.suite == suite.name])
    if target_lines:
        lines += ["## Targets", "", *(f"- {line}" for line in target_lines), ""]
    return "\n".join(lines)


def write_json(path: Path, env: Environment, results: list[Result], target_lines: list[str]) -> None:
    data = {"environment": env.as_dict(), "results": [r.as_dict() for r in results], "targets": target_lines}
    path.write_text(json.dumps(data, indent=1) + "\n")


_MARKERS = "osD^vPX*<>"


def _plot_suite(ax: Axes, suite: Suite, suite_results: list[Result], results: list[Result]) -> None:
    shapes = list(dict.fromkeys(r.case.shape for r in suite_results))
    competitors = list(dict.fromkeys(r.case.competitor for r in suite_results))
    colors = colormaps["tab10" if len(competitors) <= 10 else "tab20"].colors
    values: list[float] = []
    for k, competitor in enumerate(competitors):
        points = []
        for r in suite_results:
            base = baseline_of(r, results)
            value = ratio(r.median_seconds, None if base is None else base.median_seconds)
            if r.case.competitor == competitor and value is not None:
                points.append((shapes.index(r.case.shape), value))
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        values += ys
        style = {"color": colors[k % len(colors)], "marker": _MARKERS[k // len(colors) % len(_MARKERS)]}
        ax.plot(xs, ys, linestyle="-" if len(points) > 1 else "", label=competitor, **style)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    label = ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(label)
    # Over a decade or so the major ticks alone are too few to read a value from.
    span = max(values, default=1.0) / min(values, default=1.0)
    ax.yaxis.set_minor_formatter(label if span < 30 else ticker.NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(shapes)), shapes, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(f"time {suite.ratio_header}", fontsize=8)
    ax.set_title(suite.title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(True, which="both", axis="y", alpha=0.3)


def write_plot(path: Path, env: Environment, suites: list[Suite], results: list[Result]) -> None:
    """One panel per suite: each competitor's median time over its baseline's, per shape, log scale."""
    panels = [(s, [r for r in results if r.case.suite == s.name and r.timing is not None]) for s in suites]
    panels = [(s, rs) for s, rs in panels if rs]
    if not panels:
        return
    fig = Figure(figsize=(13, 1 + 4.5 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend: files only, no display
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for ax, (suite, suite_results) in zip(axes[:, 0], panels, strict=True):
        _plot_suite(ax, suite, suite_results, results)
    fig.suptitle("\n".join(env.header_lines()[:5]), fontsize=8, x=0.01, ha="left")
    fig.savefig(path, dpi=110)
