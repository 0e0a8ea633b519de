"""The README's benchmark summary, generated from a results file so that it quotes it exactly.

    python benchmarks/summarize.py                  # print the summary of the results the README quotes
    python benchmarks/summarize.py --write-readme   # put the newest recorded CPU results' into README.md
    python benchmarks/summarize.py --check          # exit 1 if README.md does not quote its file exactly

Ratios are computed from the file's best round medians, as its tables are, and printed with the
tables' two decimals.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft_support import peft_oft_conv_is_exact
from suites import block_diag, butterfly, cayley, conv, layer, model, moe
from suites import lycoris as lycoris_suite

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
BEGIN = "<!-- benchmark summary: written by benchmarks/summarize.py from the results file; do not edit -->"
END = "<!-- end of benchmark summary -->"

Row = dict[str, Any]


class Results:
    """A results file's rows, looked up by suite and competitor names."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.env: dict[str, Any] = data["environment"]
        self.rows: list[Row] = data["results"]
        self.targets: list[str] = data.get("targets", [])
        self.agreement: dict[str, Any] | None = data.get("agreement")

    def rows_of(self, suite: str, competitor: str) -> list[Row]:
        return [r for r in self.rows if r["suite"] == suite and r["competitor"] == competitor]

    def time_ratios(self, suite: str, competitor: str, other: str) -> list[float]:
        """``competitor``'s time over ``other``'s, per shape where both were measured."""
        out = []
        for mine in self.rows_of(suite, competitor):
            for theirs in self.rows_of(suite, other):
                if mine["shape"] == theirs["shape"] and mine["median_seconds"] and theirs["median_seconds"]:
                    out.append(mine["median_seconds"] / theirs["median_seconds"])
        return out

    def at(self, suite: str, shape: str, competitor: str, other: str) -> float | None:
        """``competitor``'s time over ``other``'s on ``shape``, if both were measured there."""
        ratios = [
            mine["median_seconds"] / theirs["median_seconds"]
            for mine in self.rows_of(suite, competitor)
            for theirs in self.rows_of(suite, other)
            if mine["shape"] == theirs["shape"] == shape
            and mine["median_seconds"]
            and theirs["median_seconds"]
        ]
        return ratios[0] if ratios else None

    def shapes(self, suite: str) -> list[str]:
        return list(dict.fromkeys(r["shape"] for r in self.rows if r["suite"] == suite))

    def one(self, suite: str, competitor: str, other: str) -> float | None:
        ratios = self.time_ratios(suite, competitor, other)
        return ratios[0] if len(ratios) == 1 else None

    def peak_at(self, suite: str, shape: str, competitor: str) -> float | None:
        rows = [r for r in self.rows_of(suite, competitor) if r["shape"] == shape]
        peak = rows[0].get("peak_bytes") if rows else None
        return None if peak is None else peak / 2**20

    def peak_mib(self, suite: str, competitor: str) -> float | None:
        rows = self.rows_of(suite, competitor)
        peak = rows[0].get("peak_bytes") if len(rows) == 1 else None
        return None if peak is None else peak / 2**20

    def shape(self, suite: str) -> str | None:
        shapes = {r["shape"] for r in self.rows if r["suite"] == suite}
        return shapes.pop() if len(shapes) == 1 else None


def x(value: float) -> str:
    return f"{value:.2f}x"


def span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return x(low) if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}x"


def _header(res: Results, name: str) -> str:
    e = res.env
    counts = {verdict: 0 for verdict in ("PASS", "MISS", "WITHIN NOISE", "NOT MEASURED")}
    for line in res.targets:
        for verdict in counts:
            if line.startswith(verdict):
                counts[verdict] += 1
    text = (
        f"`benchmarks/results/{name}.*`: {e['device_name']}, {e['threads']} threads, torch {e['torch']}, "
        f"peft {e['peft']}, {e['date'][:10]}. Targets: {counts['PASS']} PASS, {counts['MISS']} MISS, "
        f"{counts['WITHIN NOISE']} within noise, {counts['NOT MEASURED']} not measured."
    )
    if res.agreement is not None and "time" in res.agreement:
        text += (
            f" It and the run just before it (`{res.agreement['first'].removesuffix('.json')}`) agree "
            f"within {100 * res.agreement['time']:.1f}% on every time ratio."
        )
    return text


def _layer(res: Results) -> str | None:
    oft = res.one("layer", layer.oft_label(32), layer.FROZEN)
    peft_oft = res.one("layer", layer.peft_oft_label(32), layer.FROZEN)
    boft = res.one("layer", layer.boft_label(8, 4), layer.FROZEN)
    faster = res.one("layer", layer.peft_boft_label(8, 1), layer.boft_label(8, 4))
    if None in (oft, peft_oft, boft, faster):
        return None
    return (
        f"One training step of a single layer ({res.shape('layer')}): `OFTLinear` b=32 costs {x(oft)} the "
        f"frozen `nn.Linear` (PEFT's OFT: {x(peft_oft)}); `BOFTLinear` b=8, m=4 costs {x(boft)}, "
        f"{x(faster)} faster than PEFT's BOFT with one factor"
        + (" (PEFT runs only one factor on CPU)." if res.env["device"] == "cpu" else ".")
    )


def _model(res: Results) -> str | None:
    boft_m4 = model.orthoft_boft_label(4)
    oft = res.one("model", model.ORTHOFT_OFT, model.PEFT_OFT)
    boft = res.one("model", boft_m4, model.PEFT_LORA)
    faster = res.one("model", model.peft_boft_label(1), boft_m4)
    names = [model.ORTHOFT_OFT, model.PEFT_OFT, boft_m4, model.PEFT_LORA]
    peaks = [res.peak_mib("model", name) for name in names]
    if None in (oft, boft, faster) or None in peaks:
        return None
    mib = [f"{p:.0f} MiB" for p in peaks]
    return (
        f"A training step (forward, backward, AdamW) of a Llama-style decoder ({res.shape('model')}), "
        f"adapters on all linear layers: orthoft's OFT b=32 takes {x(oft)} the time of PEFT's OFT, "
        f"orthoft's BOFT b=8, m=4 {x(boft)} the time of PEFT's LoRA r=16 and is {x(faster)} faster than "
        f"PEFT's BOFT with one factor. Peak memory of the step: {mib[0]} (orthoft OFT), {mib[1]} (PEFT OFT), "
        f"{mib[2]} (orthoft BOFT m=4), {mib[3]} (LoRA)."
    )


def _operators(res: Results) -> str | None:
    parts = []
    blocks = res.time_ratios("block_diag", block_diag.TORCH, block_diag.ORTHOFT)
    if blocks:
        parts.append(f"`block_diag` is {span(blocks)} faster than `torch.block_diag`")
    solve = res.time_ratios("cayley", cayley.SOLVE, cayley.ORTHOFT_EXACT)
    neumann = res.time_ratios("cayley", cayley.PEFT_NEUMANN, cayley.ORTHOFT_NEUMANN)
    if solve and neumann:
        parts.append(
            f"exact `cayley` {span(solve)} faster than a `torch.linalg.solve` Cayley, the Neumann series "
            f"{span(neumann)} faster than PEFT's"
        )
    dense = res.time_ratios("butterfly", butterfly.PEFT_WAY, butterfly.ORTHOFT)
    if dense:
        parts.append(f"`butterfly` {span(dense)} faster than PEFT's dense construction")
    if not parts:
        return None
    return "Operators, forward + backward (below 1x: slower): " + "; ".join(parts) + "."


def _conv(res: Results) -> str | None:
    competitors = {r["competitor"] for r in res.rows if r["suite"] == "conv"}
    ours = [c for c in competitors if c.startswith(("OFTConv2d", "BOFTConv2d"))]
    ratios = [value for c in ours for value in res.time_ratios("conv", c, conv.FROZEN)]
    peft_oft = [c for c in competitors if c.startswith(f"{conv.PEFT_OFT} b=32")]
    peft = [value for c in peft_oft for value in res.time_ratios("conv", c, conv.FROZEN)]
    if not ratios or not peft:
        return None
    if peft_oft_conv_is_exact(res.env["peft"]):
        return (
            f"`OFTConv2d`/`BOFTConv2d` on ResNet-50 shapes cost {span(ratios)} the frozen conv; PEFT "
            f"{res.env['peft']}'s OFT Conv2d, exact since 0.22, costs {span(peft)}."
        )
    return (
        f"`OFTConv2d`/`BOFTConv2d` on ResNet-50 shapes cost {span(ratios)} the frozen conv, where PEFT "
        f"{res.env['peft']}'s OFT Conv2d costs up to {x(max(peft))} (and is not exact: PEFT before 0.22 "
        "unfolds the input)."
    )


def _lycoris(res: Results) -> str | None:
    parts = []
    for shape in res.shapes("lycoris"):
        figures = []
        for algo, b in (("diag-oft", 32), ("boft", 8)):
            ours = res.at("lycoris", shape, lycoris_suite.orthoft_label(algo, b), lycoris_suite.FROZEN)
            bypass = lycoris_suite.lycoris_label(algo, b, "bypass")
            theirs = res.at("lycoris", shape, bypass, lycoris_suite.FROZEN)
            if ours is None or theirs is None:
                return None
            figures.append(f"{lycoris_suite.ALGORITHMS[algo]} b={b} {x(ours)} (LyCORIS: {x(theirs)})")
        parts.append(f"{shape}: " + ", ".join(figures))
    if not parts:
        return None
    return (
        "LyCORIS's output-side OFT, one training step, time over the frozen model, orthoft against "
        "LyCORIS's own modules in bypass mode: " + "; ".join(parts) + "."
    )


def _moe(res: Results) -> str | None:
    parts = []
    for shape in res.shapes("moe"):
        figures = []
        for name in (moe.ORTHOFT_OFT, moe.ORTHOFT_BOFT, moe.PEFT_LORA):
            ratio, peak = res.at("moe", shape, name, moe.FROZEN), res.peak_at("moe", shape, name)
            if ratio is None or peak is None:
                return None
            figures.append(f"{name} {x(ratio)}, {peak:.0f} MiB")
        parts.append(f"{shape}: " + "; ".join(figures))
    if not parts:
        return None
    return (
        "A training step of a Qwen3-MoE decoder with adapters on every expert weight "
        "(`target_parameters`), time over the frozen model and peak memory: " + " | ".join(parts) + "."
    )


_SECTIONS: list[Callable[[Results], str | None]] = [_model, _moe, _layer, _conv, _lycoris, _operators]


def summary(data: dict[str, Any], name: str) -> str:
    """The generated bullet list; ``name`` is the results file's stem."""
    res = Results(data)
    lines = [_header(res, name)] + [line for section in _SECTIONS if (line := section(res)) is not None]
    return "\n".join(f"- {line}" for line in lines)


def newest_results(folder: Path = RESULTS, device: str = "cpu") -> Path:
    """The results file of ``device`` with the latest date inside it."""
    files = [(json.loads(p.read_text())["environment"], p) for p in folder.glob(f"{device}-*.json")]
    if not files:
        raise FileNotFoundError(f"no {device} results (*.json) in {folder}")
    return max(files, key=lambda f: f[0]["date"])[1]


def quoted_results(readme: Path = README) -> Path:
    """The results file that the README's summary names."""
    found = re.search(r"`benchmarks/results/([^`*/]+)\.\*`", block_of(readme.read_text()))
    if found is None:
        raise ValueError(f"{readme.name}'s benchmark summary names no `benchmarks/results/<stem>.*` file")
    return RESULTS / f"{found.group(1)}.json"


def block_of(text: str) -> str:
    """What lies between the markers."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"expected one pair of markers in the README:\n{BEGIN}\n...\n{END}")
    return text.split(BEGIN)[1].split(END)[0]


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block``."""
    block_of(text)
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def readme_with_summary(results: Path, readme: Path = README) -> str:
    block = summary(json.loads(results.read_text()), results.stem)
    return replace_block(readme.read_text(), block)


def write_readme(results: Path, readme: Path = README) -> None:
    readme.write_text(readme_with_summary(results, readme))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "results",
        nargs="?",
        type=Path,
        help="a results .json (default: --write-readme the newest recorded CPU one, else the one quoted)",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write-readme", action="store_true", help=f"write the summary into {README.name}")
    action.add_argument("--check", action="store_true", help=f"exit 1 if {README.name} differs")
    args = parser.parse_args(argv)
    if args.write_readme:
        write_readme(args.results or newest_results())
        return 0
    results = args.results or quoted_results()
    if args.check:
        if README.read_text() != readme_with_summary(results):
            print(
                f"{README.name}'s benchmark summary differs from {results.name}: run {Path(__file__).name} "
                "--write-readme",
                file=sys.stderr,
            )
            return 1
    else:
        print(summary(json.loads(results.read_text()), results.stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
