"""The export-to-LoRA benchmark runs in its quick mode and writes its table where ``--out`` says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from peft_interop import needs_peft_lora_converter

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lora_export.py"


@needs_peft_lora_converter
def test_quick_mode_times_both_exporters_at_every_rank(tmp_path: Path) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=environment)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (written,) = tmp_path.glob("lora-export_cpu_quick_*.md")
    text = written.read_text()
    for line in ("- device:", "- versions:", "- date:", "- command:", "- model:"):
        assert line in text
    rows = [row for row in text.splitlines() if row.startswith("| 16 |") or row.startswith("| 64 |")]
    rows += [row for row in text.splitlines() if row.startswith("| full |")]
    assert len(rows) == 8  # three exporters at ranks 16 and 64, two at full rank
    full_rank_errors = [float(row.split("|")[5]) for row in rows if row.startswith("| full | orthoft")]
    assert full_rank_errors == [0.0]  # exact at full rank
