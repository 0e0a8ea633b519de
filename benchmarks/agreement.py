"""How far two runs' ratios lie apart: the check that a result can be trusted.

    python benchmarks/agreement.py FIRST.json SECOND.json

Every competitor's time and peak memory over its baseline's, in each run; the disagreement of a ratio
is the larger of the two over the smaller, minus 1. ``run.py --twice`` reports the same for its runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# (suite, shape, dtype, competitor, "time" or "memory")
Key = tuple[str, str, str, str, str]

_FIELDS = {"time": "median_seconds", "memory": "peak_bytes"}


def ratios(results: list[dict[str, Any]]) -> dict[Key, float]:
    """Each competitor's time and peak memory over its baseline's, as a result file lists them."""
    by_name = {(r["suite"], r["shape"], r["dtype"], r["competitor"]): r for r in results}
    out: dict[Key, float] = {}
    for r in results:
        base = by_name.get((r["suite"], r["shape"], r["dtype"], r["baseline"]))
        if base is None or base is r:
            continue
        for kind, field in _FIELDS.items():
            value, reference = r.get(field), base.get(field)
            if value is not None and reference:
                out[(r["suite"], r["shape"], r["dtype"], r["competitor"], kind)] = value / reference
    return out


def apart(a: float, b: float) -> float:
    """The larger over the smaller, minus 1; two zeros (a step that allocates nothing) agree."""
    if a == b:
        return 0.0
    return max(a, b) / min(a, b) - 1 if min(a, b) > 0 else math.inf


def disagreements(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> dict[Key, float]:
    a, b = ratios(first), ratios(second)
    return {key: apart(a[key], b[key]) for key in a.keys() & b.keys()}


def worst(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> dict[str, tuple[float, Key, int]]:
    """Per kind ("time", "memory"): the largest disagreement, its ratio and how many ratios were compared."""
    found = disagreements(first, second)
    out = {}
    for kind in _FIELDS:
        of_kind = [(value, key) for key, value in found.items() if key[4] == kind]
        if of_kind:
            value, key = max(of_kind)
            out[kind] = (value, key, len(of_kind))
    return out


def summary_lines(first: list[dict[str, Any]], second: list[dict[str, Any]], first_name: str) -> list[str]:
    lines = [f"Ratios of this run against {first_name}: the larger over the smaller, minus 1.", ""]
    found = worst(first, second)
    for kind in _FIELDS:
        if kind not in found:
            lines.append(f"- {kind}: no ratio measured in both runs")
            continue
        value, (suite, shape, dtype, competitor, _), count = found[kind]
        where = f"{suite}, {shape}, {competitor}, {dtype}"
        lines.append(f"- {kind}: at most {100 * value:.1f}% over {count} ratios ({where})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    first, second = (json.loads(p.read_text())["results"] for p in (args.first, args.second))
    print("\n".join(summary_lines(first, second, args.first.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
