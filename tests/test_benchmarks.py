"""The benchmark harness: the tiniest case of every suite on CPU, its outputs, and the target checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import orthoft

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SUITES = {"block_diag", "cayley", "butterfly", "layer", "conv", "model"}


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
    results = data["results"]
    assert {r["suite"] for r in results} == SUITES
    for r in results:
        if r["note"] is not None:
            assert r["note"].startswith("skipped: "), r
            continue
        assert _positive_finite(r["median_seconds"]), r
        assert r["step_seconds"] and all(_positive_finite(t) for t in r["step_seconds"]), r
        assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0, r
    ours = ("orthoft", "OFT", "BOFT")
    assert {r["suite"] for r in results if r["note"] is None and r["competitor"].startswith(ours)} == SUITES
    # Some memory grows with the case: the largest peak of a suite is more than RSS noise.
    for suite in SUITES:
        assert max(r["peak_bytes"] or 0 for r in results if r["suite"] == suite) > 2**16, suite


def test_smoke_run_writes_table_and_plot(smoke_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = smoke_run
    table = _only(out, ".md").read_text()
    for line in ("- device: ", "- torch: ", "- orthoft: ", "- peft: ", "- date: ", "- command: "):
        assert line in table
    assert "| shape | competitor | dtype | median ms | time ÷ frozen nn.Linear |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    results = json.loads(_only(out, ".json").read_text())["results"]
    assert len(rows) == len(results) + len(SUITES)  # one header per suite
    assert table in proc.stdout
    png = _only(out, ".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_gpu_fails_clearly(tmp_path: Path) -> None:
    proc = _run("--device", "cuda", out=tmp_path)
    assert proc.returncode == 2
    assert "--device cuda: no CUDA device is available" in proc.stderr
    assert not list(tmp_path.iterdir())


def _result(suite: str, shape: str, competitor: str, seconds: float) -> Any:
    from cases import Case
    from outcomes import Result
    from timing import Timing

    return Result(Case(suite, shape, competitor, competitor, "float32"), Timing([seconds], 1))


def test_targets_report_pass_miss_and_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from suites import layer
    from targets import check

    shape = layer.shape_label(1024, 2048)
    results = [
        _result("layer", shape, layer.FROZEN, 1.0),
        _result("layer", shape, layer.boft_label(8, 4), 1.8),  # 1.8x the frozen layer: 20% over 1.5x
        _result("layer", shape, layer.peft_boft_label(8, 1), 9.0),  # 5x slower: passes 3x
    ]
    lines = check(results, "cpu")
    boft = layer.boft_label(8, 4)
    assert lines[0] == f"MISS  {boft} within 1.5x of {layer.FROZEN}: 1.80x, 20% over (float32, {shape})"
    assert lines[1].startswith(f"PASS  {boft} at least 3x faster than {layer.peft_boft_label(8, 1)}: 5.00x")
    assert all(line.startswith("NOT MEASURED") for line in lines[2:])
    assert len(lines) == 5  # the CPU targets only
