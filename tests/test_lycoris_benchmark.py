"""The lycoris benchmark suite: every smoke case builds and steps, on the same math as LyCORIS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _benchmarks_importable() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield


def test_smoke_cases_build_and_step() -> None:
    pytest.importorskip("lycoris")
    from cases import Settings
    from suites import SUITES

    suite = SUITES["lycoris"]
    cases = suite.cases(Settings(torch.device("cpu"), "smoke", None))
    competitors = {case.competitor for case in cases}
    assert {
        "orthoft diag-OFT b=8",
        "LyCORIS diag-OFT b=8 bypass",
        "LyCORIS BOFT b=4 weight mode",
    } <= competitors
    assert all(case.skip is None for case in cases)
    for case in cases:
        step = suite.build(case.spec, torch.device("cpu"), torch.float32, False)
        step(0)
