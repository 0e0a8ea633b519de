"""Benchmarks of orthoft against torch, PEFT and plain layers.

    python benchmarks/run.py                       # every suite, default sizes, cuda if available
    python benchmarks/run.py --quick --device cpu  # a small subset, a few minutes on two cores
    python benchmarks/run.py --device cpu --twice --record   # the recorded CPU run, quoted by the README
    python benchmarks/run.py --suites layer --features 1024,4096 --tokens 2048,16384

Prints a markdown table per suite and the targets, and writes ``<stem>.md``, ``<stem>.json`` and
``<stem>.png`` into ``--out`` (default ``benchmarks/runs/``, which git ignores), the stem naming the
device, the dtypes and the date. Only ``--record`` writes into ``benchmarks/results/``, the tracked
folder, and a recorded full CPU run also writes the README's summary.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import agreement
import allocator
import report
import summarize
import targets
from cases import DTYPES, Case, Settings, Size, Step, Suite
from environment import Environment, describe, file_stem
from memory import measure_memory
from outcomes import Result
from suites import SUITES
from timing import TimingPolicy, default_policy, measure_interleaved

DEFAULT_OUT = Path(__file__).resolve().parent / "runs"
RECORDED = summarize.RESULTS
CPU_THREADS = 2  # fixed, so that runs on different machines and days compare


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="default: float32, except the butterfly suite on CUDA (bfloat16); half dtypes are slow on CPU",
    )
    parser.add_argument("--suites", nargs="+", choices=list(SUITES), default=list(SUITES), metavar="SUITE")
    parser.add_argument(
        "--features", type=_int_list, help="layer: in = out features; butterfly: columns of x"
    )
    parser.add_argument("--tokens", type=_int_list, help="layer: tokens; butterfly: rows of x")
    parser.add_argument("--batch", type=int, help="conv: batch size (default 32 on CUDA, 8 on CPU)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small subset (a few minutes on a 2-core CPU)")
    size.add_argument(
        "--smoke", action="store_true", help="the tiniest case of each suite, to check the harness"
    )
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 7; --quick 5 on CPU)")
    parser.add_argument(
        "--threads",
        type=int,
        help=f"torch CPU threads (default {CPU_THREADS} on CPU, torch's choice on CUDA)",
    )
    parser.add_argument(
        "--twice",
        action="store_true",
        help="run everything twice and report how far the two runs' ratios differ",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}, git-ignored)"
    )
    where.add_argument(
        "--record",
        action="store_true",
        help=f"write into {RECORDED} (tracked) and, for a full CPU run, the README's benchmark summary",
    )
    return parser


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); run with --device cpu"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for option in ("batch", "rounds", "threads"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            parser.error(f"--{option} must be positive, got {value}")
    if device.type == "cpu" and args.dtype in ("float16", "bfloat16"):
        print(f"note: {args.dtype} on CPU is slow; the timings say little about GPUs", file=sys.stderr)
    size: Size = "smoke" if args.smoke else "quick" if args.quick else "full"
    return Settings(device, size, args.dtype, args.features, args.tokens, args.batch)


def _groups(cases: list[Case]) -> list[list[Case]]:
    """The competitors of each shape, in the suites' order: what one set of interleaved rounds times."""
    key = lambda c: (c.suite, c.shape, c.dtype)  # noqa: E731
    return [list(group) for _, group in itertools.groupby(cases, key)]


def _measure_group(group: list[Case], device: torch.device, policy: TimingPolicy) -> list[Result]:
    """Peak memory of each competitor, one at a time, then all of them timed in interleaved rounds."""
    results = [Result(c, note=f"skipped: {c.skip}" if c.skip else None) for c in group]
    live = [r for r in results if r.note is None]

    def build(case: Case, rotate: bool) -> Step:
        return SUITES[case.suite].build(case.spec, device, DTYPES[case.dtype], rotate)

    for r in live:
        try:
            r.memory = measure_memory(functools.partial(build, r.case, False), device)
        except torch.cuda.OutOfMemoryError:
            r.note = "failed: out of memory"
            torch.cuda.empty_cache()
    live = [r for r in live if r.note is None]
    try:
        steps = [build(r.case, True) for r in live]
        for r, timing in zip(live, measure_interleaved(steps, device, policy), strict=True):
            r.timing = timing
    except torch.cuda.OutOfMemoryError:
        for r in live:
            r.note, r.memory = "failed: out of memory with its competitors built", None
        torch.cuda.empty_cache()
    return results


@dataclass
class Run:
    env: Environment
    started: datetime.datetime
    results: list[Result]
    target_lines: list[str]


def _run(cases: list[Case], settings: Settings, policy: TimingPolicy) -> Run:
    started = datetime.datetime.now().astimezone()
    torch.manual_seed(0)
    results = []
    groups = _groups(cases)
    with tqdm(groups, desc="cases", unit="shape", file=sys.stderr) as bar:
        for group in bar:
            bar.set_postfix_str(f"{group[0].suite}: {group[0].shape}")
            results += _measure_group(group, settings.device, policy)
    device_type = settings.device.type
    target_lines = targets.check(results, device_type, settings.size)
    return Run(describe(settings.device, started), started, results, target_lines)


def _write(
    run: Run, suites: list[Suite], out: Path, dtypes: list[str], extra: list[str], **json_extra: object
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(run.env, dtypes, run.started)
    for n in itertools.count(2):  # never overwrite a result, even of a run started in the same second
        if not (out / f"{stem}.json").exists():
            break
        stem = f"{file_stem(run.env, dtypes, run.started)}-{n}"
    paths = [out / f"{stem}{suffix}" for suffix in (".md", ".json", ".png")]
    text = report.markdown(run.env, suites, run.results, run.target_lines, extra)
    paths[0].write_text(text)
    report.write_json(paths[1], run.env, run.results, run.target_lines, **json_extra)
    report.write_plot(paths[2], run.env, suites, run.results)
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths[1]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = _settings(args, parser)
    threads = args.threads or (CPU_THREADS if settings.device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if settings.device.type == "cpu":
        allocator.keep_memory_mapped()
    suites = [SUITES[name] for name in args.suites]
    cases = [case for suite in suites for case in suite.cases(settings)]
    dtypes = sorted({c.dtype for c in cases})
    policy = default_policy(settings.device, settings.size, args.rounds)

    out = RECORDED if args.record else args.out
    first = _run(cases, settings, policy)
    path = _write(first, suites, out, dtypes, [])
    if args.twice:
        second = _run(cases, settings, policy)
        a, b = ([r.as_dict() for r in run.results] for run in (first, second))
        lines = agreement.summary_lines(a, b, path.name)
        worst = {kind: value for kind, (value, _, _) in agreement.worst(a, b).items()}
        extra = ["## Agreement with the first run", "", *lines, ""]
        path = _write(second, suites, out, dtypes, extra, agreement={"first": path.name, **worst})
    if args.record and settings.device.type == "cpu" and settings.size == "full":
        summarize.write_readme(path)
        print(f"wrote the benchmark summary of {summarize.README} from {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
