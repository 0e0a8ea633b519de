"""A save cut short (here by a file-size limit, as a full disk would) leaves the previous adapter intact:
both files are written under other names and renamed into place only when both are whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import orthoft
from orthoft.adapter_io import CONFIG_NAME, WEIGHTS_NAME

from tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="file-size limits are POSIX")

# In one process (importing orthoft takes a while): save an adapter into each directory, then save another
# one over it under a file-size limit (a soft one, lifted afterwards) and print how each save ended. Many
# names in target_modules (most match nothing) make adapter_config.json larger than the weights, so that
# a limit between their sizes cuts the config only.
SAVER = """
import json, resource, signal, sys
import torch, orthoft
from orthoft.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from tiny_models import tiny_llama

targets = ["q_proj", *(f"unused_projection_{i}" for i in range(3000))]

def adapted(seed):
    config = orthoft.OFTConfig(target_modules=targets, oft_block_size=8)
    model = orthoft.get_orthoft_model(tiny_llama(), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1)
    return model

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a kill
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
outcomes = {}
for directory in sys.argv[1:]:
    orthoft.save_adapter(adapted(1), directory)
sizes = {name: len(open(f"{sys.argv[1]}/{name}", "rb").read()) for name in (WEIGHTS_NAME, CONFIG_NAME)}
limits = {WEIGHTS_NAME: sizes[WEIGHTS_NAME] // 2, CONFIG_NAME: sizes[WEIGHTS_NAME] + 512}
for directory, cut in zip(sys.argv[2:], (WEIGHTS_NAME, CONFIG_NAME)):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits[cut], hard))
    try:
        orthoft.save_adapter(adapted(2), directory)
        outcomes[cut] = "saved"
    except OSError as error:
        outcomes[cut] = f"{type(error).__name__}: {error}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
orthoft.save_adapter(adapted(2), sys.argv[1])
print(json.dumps({"sizes": sizes, "outcomes": outcomes}))
"""


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_a_save_cut_short_leaves_the_previous_adapter(tmp_path: Path) -> None:
    reference, weights_cut, config_cut = (tmp_path / name for name in ("reference", "weights", "config"))
    python_path = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    result = subprocess.run(
        [sys.executable, "-c", SAVER, str(reference), str(weights_cut), str(config_cut)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sizes"][CONFIG_NAME] > report["sizes"][WEIGHTS_NAME] + 1024
    for cut in (WEIGHTS_NAME, CONFIG_NAME):
        assert report["outcomes"][cut].startswith("OSError") and "File too large" in report["outcomes"][cut]
    # The reference directory took the second adapter without a limit: its weights differ from the first's.
    previous = files(weights_cut)
    assert previous.keys() == {WEIGHTS_NAME, CONFIG_NAME}
    assert files(reference)[WEIGHTS_NAME] != previous[WEIGHTS_NAME]
    # Both directories cut short hold the first adapter, byte for byte, and nothing else.
    assert files(config_cut) == previous
    loaded = orthoft.adapter_io.adapter_state_dict(orthoft.load_adapter(tiny_llama(), config_cut))
    assert loaded and all(value.abs().sum() > 0 for value in loaded.values())
