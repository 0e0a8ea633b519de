"""The benchmark harness: a smoke run of every suite, the interleaved timing, the memory count, the
targets' verdicts, the agreement of two runs and the README summary."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import orthoft

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SUITES = {"block_diag", "cayley", "butterfly", "layer", "conv", "model", "moe", "lycoris"}
MIB = 2**20


@pytest.fixture(scope="module", autouse=True)
def _benchmarks_importable() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield


def _run(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(BENCHMARKS / "run.py"), *args, "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench")
    proc = _run("--smoke", "--device", "cpu", "--threads", "1", out=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def _only(folder: Path, suffix: str) -> Path:
    files = list(folder.glob(f"*{suffix}"))
    assert len(files) == 1, files
    assert files[0].name.startswith("cpu-"), files[0].name
    assert "_float32_" in files[0].name, files[0].name
    return files[0]


def _positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_run_measures_every_suite(smoke_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = smoke_run
    data = json.loads(_only(out, ".json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["orthoft"] == orthoft.__version__
    assert data["environment"]["threads"] == 1
    results = data["results"]
    assert {r["suite"] for r in results} == SUITES
    for r in results:
        if r["note"] is not None:
            assert r["note"].startswith("skipped: "), r
            continue
        assert _positive_finite(r["median_seconds"]), r
        rounds = r["round_seconds"]
        assert len(rounds) == 2 and all(_positive_finite(t) for times in rounds for t in times), r
        assert r["median_seconds"] == min(statistics.median(times) for times in rounds), r
        # Every step but the floor's (which writes into buffers it holds) allocates at least its output.
        assert r["held_bytes"] >= 0 and (r["peak_bytes"] > 0 or r["competitor"].startswith("memory floor")), r
    ours = ("orthoft", "OFT", "BOFT")
    assert {r["suite"] for r in results if r["note"] is None and r["competitor"].startswith(ours)} == SUITES


def test_smoke_run_writes_table_plot_and_targets(
    smoke_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, proc = smoke_run
    table = _only(out, ".md").read_text()
    for line in ("- device: ", "- torch: ", "- orthoft: ", "- peft: ", "- date: ", "- command: "):
        assert line in table
    assert "| best round ms | spread | time ÷ frozen nn.Linear (rounds) | peak MiB | held MiB |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    data = json.loads(_only(out, ".json").read_text())
    assert len(rows) == len(data["results"]) + len(SUITES)  # one header per suite
    assert table in proc.stdout
    # The smoke run checks the harness: its shapes are too small for any target.
    assert data["targets"] == []
    png = _only(out, ".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_twice_writes_both_runs_and_their_agreement(tmp_path: Path) -> None:
    # The butterfly suite has a competitor that allocates nothing: its memory ratio is 0 in both runs.
    proc = _run(
        "--smoke", "--device", "cpu", "--threads", "1", "--suites", "butterfly", "--twice", out=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = sorted(
        tmp_path.glob("*.json"), key=lambda p: json.loads(p.read_text())["environment"]["date"]
    )
    data = json.loads(second.read_text())
    assert data["agreement"]["first"] == first.name
    assert data["agreement"]["time"] >= 0 and data["agreement"]["memory"] == 0
    assert "## Agreement with the first run" in second.with_suffix(".md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_gpu_fails_clearly(tmp_path: Path) -> None:
    proc = _run("--device", "cuda", out=tmp_path)
    assert proc.returncode == 2
    assert "--device cuda: no CUDA device is available" in proc.stderr
    assert not list(tmp_path.iterdir())


# Interleaved timing


def test_competitors_are_timed_in_interleaved_rounds() -> None:
    from timing import TimingPolicy, measure_interleaved

    calls: list[str] = []

    def step(name: str) -> Any:
        return lambda i: calls.append(name)

    policy = TimingPolicy(3, warmup_seconds=0, min_repeat_seconds=0, round_seconds=0, max_repeats=1)
    timings = measure_interleaved([step("A"), step("B"), step("C")], torch.device("cpu"), policy)
    assert calls[:6] == ["A", "A", "B", "B", "C", "C"]  # warm-up: two steps each
    assert calls[6:] == ["A", "B", "C"] * 3
    assert [len(t.rounds) for t in timings] == [3, 3, 3]


def test_timing_reports_best_round_median_and_spread() -> None:
    from outcomes import Result, time_ratio
    from timing import Timing

    ours = Timing([[3.0, 1.0, 2.0], [4.0, 4.0, 5.0]], inner=1)  # round medians 2 and 4
    assert (ours.best, ours.spread) == (2.0, 1.0)
    other = Timing([[1.0], [4.0]], inner=1)  # a disturbance in round 2 slows both
    ratio = time_ratio(Result(_case("ours"), ours), Result(_case("other"), other))
    assert ratio is not None
    assert (ratio.value, ratio.low, ratio.high) == (2.0, 1.0, 2.0)


# Memory


def test_memory_counts_live_bytes_of_a_known_pattern() -> None:
    from memory import measure_memory

    def build() -> Any:
        held = torch.empty(1 * MIB, dtype=torch.uint8)

        def step(i: int) -> None:
            a = torch.empty(2 * MIB, dtype=torch.uint8)
            b = torch.empty(3 * MIB, dtype=torch.uint8)
            del a
            c = torch.empty(4 * MIB, dtype=torch.uint8)  # live: b and c, 7 MiB; a's 2 MiB are gone
            del b, c
            held.add_(i)

        return step

    memory = measure_memory(build, torch.device("cpu"))
    assert (memory.held_bytes, memory.peak_bytes) == (1 * MIB, 7 * MIB)


# Blocks drawn far from identity, so that a wrong product shows: the series check rightly warns there.
@pytest.mark.filterwarnings("ignore::orthoft.orthogonality.OrthogonalityWarning")
@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_unfolded_input_competitor_computes_oft_conv2d(stride: int, padding: int, dilation: int) -> None:
    from orthoft.layers import OFTConv2d
    from suites.unfolded_input import UnfoldedInputOFTConv2d

    torch.manual_seed(0)
    base = nn.Conv2d(6, 5, 3, stride, padding, dilation, dtype=torch.float64)
    layer = OFTConv2d.from_module(base, block_size=9)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    competitor = UnfoldedInputOFTConv2d(layer)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64, requires_grad=True)
    trained = [x] + [p for p in layer.parameters() if p.requires_grad]
    expected = layer(x)
    got = competitor(x)
    dy = torch.randn_like(expected)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got, trained, dy)
    expected_grads = torch.autograd.grad(expected, trained, dy)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_memory_of_a_frozen_linear_step_is_its_output_and_input_gradient() -> None:
    from memory import measure_memory
    from steps import module_step

    tokens, features_in, features_out = 32, 16, 8

    def build() -> Any:
        layer = nn.Linear(features_in, features_out).requires_grad_(False)
        return module_step(layer, (tokens, features_in), torch.device("cpu"), torch.float32)

    memory = measure_memory(build, torch.device("cpu"))
    # held: x, dy, weight, bias; peak: y (alive through backward) and dx
    held = 4 * (tokens * features_in + tokens * features_out + features_out * features_in + features_out)
    assert memory.held_bytes == held
    assert memory.peak_bytes == 4 * (tokens * features_out + tokens * features_in)


# Targets


def _case(competitor: str, suite: str = "layer", shape: str = "s") -> Any:
    from cases import Case

    return Case(suite, shape, competitor, competitor, "float32")


@pytest.mark.parametrize(
    ("at_most", "limit", "ratio", "expected"),
    [
        (True, 1.4, (1.2, 1.1, 1.3), "PASS  a within 1.4x of b: 1.20x (rounds 1.10-1.30x)"),
        (True, 1.4, (1.35, 1.3, 1.5), "WITHIN NOISE  a within 1.4x of b: 1.35x (rounds 1.30-1.50x)"),
        (True, 1.4, (1.54, 1.45, 1.6), "MISS  a within 1.4x of b: 1.54x (rounds 1.45-1.60x), 10% over"),
        (False, 2.0, (0.25, 0.2, 0.4), "PASS  a at least 2x faster than b: 4.00x faster (rounds 2.50-5.00x)"),
        (
            False,
            2.0,
            (0.5, 0.4, 0.625),
            "WITHIN NOISE  a at least 2x faster than b: 2.00x faster (rounds 1.60-2.50x)",
        ),
        (False, 2.0, (0.8, 0.8, 0.8), "MISS  a at least 2x faster than b: 1.25x faster, 38% short"),
        (False, 1.0, (0.9, 0.8, 0.95), "PASS  a faster than b: 1.11x faster (rounds 1.05-1.25x)"),
    ],
)
def test_time_target_verdict_is_decided_only_beyond_the_rounds(
    at_most: bool, limit: float, ratio: tuple[float, float, float], expected: str
) -> None:
    from outcomes import Ratio
    from targets import Target, Where, verdict

    target = Target(Where("cpu", "float32", "layer", "s"), "a", "b", limit, at_most)
    assert verdict(target, Ratio(*ratio)) == expected


def test_targets_check_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import targets
    from memory import Memory
    from outcomes import Result
    from timing import Timing

    where = targets.Where("cpu", "float32", "layer", "s")
    listed = [
        targets.Target(where, "ours", "frozen", 1.4, at_most=True),
        targets.Target(where, "ours", "peft", 1.0, at_most=True, metric="memory"),
        targets.Target(where, "ours", "missing", 1.0, at_most=True),
    ]
    asked: list[tuple[str, str]] = []

    def targets_for(device: str, size: str) -> list[Any]:
        asked.append((device, size))
        return listed

    monkeypatch.setattr(targets, "targets_for", targets_for)

    def result(name: str, rounds: list[float], peak: int) -> Result:
        return Result(_case(name), Timing([[t] for t in rounds], 1), Memory(held_bytes=1, peak_bytes=peak))

    results = [
        result("frozen", [1.0, 2.0, 1.0], 10),
        result("ours", [1.3, 2.7, 1.35], 12),  # per round 1.30x, 1.35x, 1.35x of the frozen layer
        result("peft", [5.0, 5.0, 5.0], 11),
        Result(_case("missing"), note="skipped: not here"),
    ]
    measured = [
        "PASS  ours within 1.4x of frozen: 1.30x (rounds 1.30-1.35x) (float32, s)",
        "MISS  ours peak memory no larger than peft's: 1.09x, 9% over (float32, s)",
    ]
    # The full run lists every target; a quick run only those it measured.
    assert targets.check(results, "cpu", "full") == [
        *measured,
        "NOT MEASURED  ours no slower than missing: missing skipped: not here (float32, s)",
    ]
    assert targets.check(results, "cuda", "quick") == measured
    assert asked == [("cpu", "full"), ("cuda", "quick")]


@pytest.mark.parametrize("size", ["quick", "full"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_target_names_cases_that_its_run_has(device: str, size: Any) -> None:
    import targets
    from cases import Settings
    from suites import SUITES as BY_NAME

    settings = Settings(torch.device(device), size, None)
    every = [c for suite in BY_NAME.values() for c in suite.cases(settings)]
    cases = {(c.suite, c.shape, c.dtype, c.competitor) for c in every}
    listed = targets.targets_for(device, size)
    assert listed
    for t in listed:
        assert t.where.device == device
        for name in (t.orthoft_case, t.other):
            assert (t.where.suite, t.where.shape, t.where.dtype, name) in cases, (t, name)
    # Every run but the smoke run judges the whole-model step.
    assert any(t.where.suite == "model" for t in listed)
    assert targets.targets_for(device, "smoke") == []


# Agreement of two runs and the README summary


def _row(competitor: str, seconds: float, peak: int, suite: str = "layer", baseline: str = "frozen") -> Any:
    return {
        "suite": suite,
        "shape": "s",
        "dtype": "float32",
        "competitor": competitor,
        "baseline": baseline,
        "median_seconds": seconds,
        "peak_bytes": peak,
    }


def test_agreement_is_the_largest_ratio_disagreement() -> None:
    import agreement

    # a: 1.2x vs 1.1x the time of the frozen layer; c allocates nothing, in both runs
    first = [_row("frozen", 1.0, 10), _row("a", 1.2, 20), _row("b", 2.0, 30), _row("c", 1.0, 0)]
    second = [_row("frozen", 2.0, 10), _row("a", 2.2, 20), _row("b", 4.2, 30), _row("c", 2.0, 0)]
    worst = agreement.worst(first, second)
    assert worst["time"][0] == pytest.approx(1.2 / 1.1 - 1)
    assert worst["time"][1][3] == "a" and worst["time"][2] == 3
    assert worst["memory"][0] == 0
    assert agreement.apart(0.0, 0.5) == math.inf


def test_summary_quotes_the_results_file() -> None:
    import summarize
    from suites import layer

    frozen, oft, peft_oft = layer.FROZEN, layer.oft_label(32), layer.peft_oft_label(32)
    boft, peft_boft = layer.boft_label(8, 4), layer.peft_boft_label(8, 1)
    rows = [
        _row(frozen, 0.0463, 1, baseline=frozen),
        _row(oft, 0.0554, 1, baseline=frozen),
        _row(peft_oft, 0.0547, 1, baseline=frozen),
        _row(boft, 0.0706, 1, baseline=frozen),
        _row(peft_boft, 0.193, 1, baseline=frozen),
    ]
    env = {"device": "cpu", "device_name": "X", "threads": 2, "torch": "t", "peft": "p"}
    env["date"] = "2026-01-02T03:04:05"
    data = {"environment": env, "results": rows, "targets": ["PASS  x", "MISS  y", "WITHIN NOISE  z"]}
    assert summarize.summary(data, "stem").splitlines() == [
        "- `benchmarks/results/stem.*`: X, 2 threads, torch t, peft p, 2026-01-02. Targets: 1 PASS, 1 MISS, "
        "1 within noise, 0 not measured.",
        "- One training step of a single layer (s): `OFTLinear` b=32 costs 1.20x the frozen `nn.Linear` "
        "(PEFT's OFT: 1.18x); `BOFTLinear` b=8, m=4 costs 1.52x, 2.73x faster than PEFT's BOFT with one "
        "factor (PEFT runs only one factor on CPU).",
    ]
    begin, end = summarize.BEGIN, summarize.END
    readme = f"intro\n{begin}\nold text\n{end}\noutro\n"
    assert summarize.replace_block(readme, "new") == f"intro\n{begin}\nnew\n{end}\noutro\n"
    with pytest.raises(ValueError, match="one pair of markers"):
        summarize.replace_block("no markers", "new")


def test_readme_summary_quotes_the_results_file_it_names() -> None:
    import summarize

    quoted = summarize.quoted_results()
    assert quoted.parent == summarize.RESULTS and quoted.is_file()
    assert summarize.main(["--check"]) == 0


def test_only_record_writes_into_the_tracked_results() -> None:
    import run
    import summarize

    parser = run._parser()
    assert parser.parse_args([]).out == run.DEFAULT_OUT != summarize.RESULTS
    assert parser.parse_args(["--record"]).record and run.RECORDED == summarize.RESULTS
    with pytest.raises(SystemExit):
        parser.parse_args(["--record", "--out", "elsewhere"])
