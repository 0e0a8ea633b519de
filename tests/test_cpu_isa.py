"""The CPU kernels under every instruction set they are compiled for.

A process runs them with the widest set its CPU offers (AVX-512, AVX2+FMA or the baseline), capped by
``ATEN_CPU_CAPABILITY`` as torch's own kernels are; the rest of the suite runs with the widest. Here the
operator tests run again in processes capped to AVX2 and to the baseline. A CPU without a set runs the
next narrower one, which is then tested twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OPERATOR_TESTS = ["test_block_diag.py", "test_butterfly.py", "test_cayley.py", "test_channel_blocks.py"]


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_operators_under_a_capped_instruction_set(capability: str) -> None:
    here = Path(__file__).parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OPERATOR_TESTS]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run(command, cwd=here, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
