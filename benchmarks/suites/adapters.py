"""The competitors of the layer suites: a base layer wrapped by orthoft, by PEFT, or left frozen."""

from __future__ import annotations

from typing import Any

from torch import nn

from orthoft.layers import BOFTConv2d, BOFTLinear, OFTConv2d, OFTLinear
from peft_support import peft_wrapped
from suites.unfolded_input import UnfoldedInputOFTConv2d

_ORTHOFT_CLASSES = {
    ("boft", nn.Linear): BOFTLinear,
    ("boft", nn.Conv2d): BOFTConv2d,
    ("oft", nn.Linear): OFTLinear,
    ("oft", nn.Conv2d): OFTConv2d,
}


def adapted_layer(base: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """``base`` with the adapter ``spec`` names: its ``kind`` and that kind's options."""
    kind = spec["kind"]
    if kind == "frozen":
        return base.requires_grad_(False)
    if kind == "weight_trained":
        base.requires_grad_(False)
        base.weight.requires_grad_(True)
        return base
    if kind == "boft":
        options = {"block_size": spec["block_size"], "n_butterfly_factor": spec["factors"]}
        return _ORTHOFT_CLASSES[kind, type(base)].from_module(base, **options)
    if kind == "oft":
        return _ORTHOFT_CLASSES[kind, type(base)].from_module(base, block_size=spec["block_size"])
    if kind == "oft_unfolded_input":
        return UnfoldedInputOFTConv2d(OFTConv2d.from_module(base, block_size=spec["block_size"]))
    if kind == "peft_boft":
        options = {"boft_block_size": spec["block_size"], "boft_n_butterfly_factor": spec["factors"]}
        return peft_wrapped(base, "boft", **options)
    if kind == "peft_oft":
        return peft_wrapped(base, "oft", r=0, oft_block_size=spec["block_size"])
    if kind == "peft_lora":
        return peft_wrapped(base, "lora", r=spec["rank"], lora_alpha=spec["rank"])
    raise ValueError(f"unknown competitor kind {kind!r}")
