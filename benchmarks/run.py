"""Benchmarks of orthoft against torch, PEFT and plain layers.

    python benchmarks/run.py                       # every suite, default sizes, cuda if available
    python benchmarks/run.py --quick --device cpu  # a small subset, about two minutes on two cores
    python benchmarks/run.py --suites layer --features 1024,4096 --tokens 2048,16384

Prints a markdown table per suite and the targets, and writes ``<stem>.md``, ``<stem>.json`` and
``<stem>.png`` into ``--out``, the stem naming the device, the dtypes and the date.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import report
import targets
from cases import DTYPES, Case, Settings, Size
from environment import describe, file_stem
from memory import cpu_peak_bytes, cuda_peak_bytes
from outcomes import Result
from suites import SUITES
from timing import TimingPolicy, default_policy, measure

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


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
    size.add_argument("--quick", action="store_true", help="a small subset (about 2 minutes on a 2-core CPU)")
    size.add_argument(
        "--smoke", action="store_true", help="the tiniest case of each suite, to check the harness"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per case (default 20 on CUDA, 7 on CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    return parser


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); run with --device cpu"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for option in ("batch", "repeats", "threads"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            parser.error(f"--{option} must be positive, got {value}")
    if device.type == "cpu" and args.dtype in ("float16", "bfloat16"):
        print(f"note: {args.dtype} on CPU is slow; the timings say little about GPUs", file=sys.stderr)
    size: Size = "smoke" if args.smoke else "quick" if args.quick else "full"
    return Settings(device, size, args.dtype, args.features, args.tokens, args.batch)


def _time_cases(cases: list[Case], settings: Settings, policy: TimingPolicy) -> list[Result]:
    """Times every case in this process; on CUDA also measures its peak memory here."""
    results = []
    device = settings.device
    with tqdm(cases, desc="timing", unit="case", file=sys.stderr) as bar:
        for case in bar:
            bar.set_postfix_str(f"{case.suite}: {case.shape}, {case.competitor}")
            if case.skip:
                results.append(Result(case, note=f"skipped: {case.skip}"))
                continue
            suite, dtype = SUITES[case.suite], DTYPES[case.dtype]
            try:
                timing = measure(suite.build(case.spec, device, dtype, True), device, policy)
                peak = None
                if device.type == "cuda":
                    peak = cuda_peak_bytes(
                        functools.partial(suite.build, case.spec, device, dtype, False), device
                    )
            except torch.cuda.OutOfMemoryError:
                results.append(Result(case, note="failed: out of memory"))
                torch.cuda.empty_cache()
                continue
            results.append(Result(case, timing, peak))
    return results


def _measure_cpu_memory(results: list[Result], threads: int) -> None:
    measured = [r for r in results if r.timing is not None]
    workers = min(2, os.cpu_count() or 1)  # RSS peaks do not disturb each other; two halve the wait
    probes = cpu_peak_bytes([r.case for r in measured], workers, threads)
    progress = tqdm(probes, desc="memory", unit="case", total=len(measured), file=sys.stderr)
    for result, (_, peak) in zip(measured, progress, strict=True):
        result.peak_bytes = peak


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = _settings(args, parser)
    now = datetime.datetime.now().astimezone()
    torch.manual_seed(0)
    suites = [SUITES[name] for name in args.suites]
    cases = [case for suite in suites for case in suite.cases(settings)]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = _time_cases(cases, settings, default_policy(settings.device, settings.size, args.repeats))
    if settings.device.type == "cpu":
        _measure_cpu_memory(results, torch.get_num_threads())

    env = describe(settings.device, now)
    target_lines = targets.check(results, settings.device.type)
    text = report.markdown(env, suites, results, target_lines)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(env, sorted({c.dtype for c in cases}), now)
    paths = [args.out / f"{stem}{suffix}" for suffix in (".md", ".json", ".png")]
    paths[0].write_text(text)
    report.write_json(paths[1], env, results, target_lines)
    report.write_plot(paths[2], env, suites, results)
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
