"""What the tests that run PEFT next to orthoft share: PEFT's several-factor BOFT on CPU, PEFT's loaders
checked for missing keys and format warnings."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import peft
import pytest
import torch
from packaging.version import Version
from peft.tuners.boft import layer as peft_boft
from torch import nn

# PEFT 0.22 made its OFT Conv2d rotate the weight and call the base conv, as orthoft's does; before, it
# unfolded and folded the input, which sums overlapping patches and differs from the base conv at init.
PEFT_OFT_CONV_EXACT = Version(peft.__version__) >= Version("0.22")
# PEFT 0.22 added its converter of OFT/BOFT layers to LoRA (peft.tuners.lora.conversion), and its LoRA
# Conv2d honours the base conv's dilation (before, lora_A ran undilated).
PEFT_HAS_LORA_CONVERTER = PEFT_LORA_CONV_DILATES = Version(peft.__version__) >= Version("0.22")
needs_peft_lora_converter = pytest.mark.skipif(
    not PEFT_HAS_LORA_CONVERTER, reason="PEFT's converter to LoRA exists from PEFT 0.22 on"
)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The models here are tiny: intra-op threads only add synchronisation, which costs up to 10x on a
    busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BlockDiagOnCpu:
    """Stands in for PEFT's JIT-compiled CUDA extension ``fbd_cuda`` with ``torch.block_diag``, the same
    function: PEFT runs BOFT with several butterfly factors only through that extension."""

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, blocks: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        return [torch.stack([torch.block_diag(*group) for group in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        # The adjoint of block_diag: the diagonal blocks of the gradient.
        b = blocks.shape[-1]
        diagonal = [grad[:, d * b : (d + 1) * b, d * b : (d + 1) * b] for d in range(blocks.shape[1])]
        return [torch.stack(diagonal, dim=1)]


def peft_with_several_factors(monkeypatch: pytest.MonkeyPatch) -> BlockDiagOnCpu:
    """Make PEFT's BOFT layers created from now on run several factors on CPU; returns the stand-in."""
    stand_in = BlockDiagOnCpu()
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", stand_in)
    return stand_in


# Warnings that say a saved adapter does not fit what PEFT or transformers expect.
FORMAT_WORDS = ("missing", "unexpected", "cayley", "peft_version", "mismatch", "not found", "incompatible")


def format_complaints(messages: list[str]) -> list[str]:
    return [message for message in messages if any(word in message.lower() for word in FORMAT_WORDS)]


def peft_from_pretrained(base: nn.Module, path: Path, adapter_name: str = "default") -> peft.PeftModel:
    """``PeftModel.from_pretrained``, failing on any warning about the saved format or its keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, path, adapter_name=adapter_name)
    complaints = format_complaints([str(w.message) for w in caught])
    assert not complaints, complaints
    return model


def transformers_load_adapter(
    model: nn.Module, path: Path, caplog: pytest.LogCaptureFixture, adapter_name: str = "default"
) -> None:
    """transformers' ``model.load_adapter``, failing on missing or unexpected keys and format warnings."""
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = model.load_adapter(str(path), adapter_name=adapter_name)
    assert not info.missing_keys and not info.unexpected_keys, info
    assert not getattr(info, "mismatched_keys", None), info
    complaints = format_complaints(
        [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    )
    assert not complaints, complaints
