"""The examples run as a user runs them, and print what they promise."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from peft_interop import one_thread  # noqa: F401 (a fixture, used by name)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_finetune_digits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("sklearn")  # the example's data set
    script = EXAMPLES / "finetune_digits.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(tmp_path), "--steps", "60"])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out

    def number(label: str) -> float:
        match = re.search(rf"{label}\S* ([0-9.e+-]+)", printed)
        assert match, printed
        return float(match.group(1))

    assert number("OFT-finetuned: test accuracy") > number("base model: test accuracy on all ten digits")
    assert number("PEFT-loaded: test accuracy") == number("OFT-finetuned: test accuracy")
    assert number(r"max \|orthoft - PEFT\| logits:") < 1e-5
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    # The base model came from from_pretrained: the adapter names it, as PEFT's would.
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
