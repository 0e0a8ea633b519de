"""Adapters trained by orthoft load into PEFT and transformers, and PEFT's load into orthoft, with equal
outputs: a tiny Llama (with biases) built from its config, trained a few steps with its own loss."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from orthoft.adapter_io import load_adapter, save_adapter
from orthoft.config import OrthoftConfig
from orthoft.tuner import get_orthoft_model, set_adapter

from peft_interop import (  # noqa: F401 (one_thread: a fixture, used by name)
    one_thread,
    peft_from_pretrained,
    peft_with_several_factors,
    transformers_load_adapter,
)
from tiny_models import tiny_llama as _tiny_llama

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(
        "ignore:Failed to load the CUDA extension",
        "ignore:Setting boft_n_butterfly_factor to 1",
        # PEFT's get_peft_model asks transformers 5 a deprecated question.
        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    ),
]

# Round trips agree to float32 rounding; an adapter far from identity moves logits by > 1e-2.
TOLERANCE = 1e-5
MOVED = 1e-2
TARGETS = ["q_proj", "v_proj", "down_proj"]

CASES: dict[str, dict[str, object]] = {
    "oft-neumann": {"peft_type": "OFT", "oft_block_size": 8},
    "oft-exact": {"peft_type": "OFT", "oft_block_size": 8, "use_cayley_neumann": False},
    "oft-r": {"peft_type": "OFT", "r": 4, "oft_block_size": 0, "num_cayley_neumann_terms": 7},
    "oft-coft": {"peft_type": "OFT", "oft_block_size": 8, "coft": True, "eps": 0.2},
    "oft-block-share": {"peft_type": "OFT", "oft_block_size": 8, "block_share": True},
    "oft-bias-all": {"peft_type": "OFT", "oft_block_size": 4, "bias": "all"},
    "oft-bias-only": {"peft_type": "OFT", "oft_block_size": 4, "bias": "oft_only"},
    "oft-modules-to-save": {"peft_type": "OFT", "oft_block_size": 8, "modules_to_save": ["lm_head"]},
    "boft-one-factor": {"peft_type": "BOFT", "boft_block_size": 4, "bias": "boft_only"},
    "boft-block-num": {"peft_type": "BOFT", "boft_block_size": 0, "boft_block_num": 4, "bias": "all"},
    "boft-two-factors": {"peft_type": "BOFT", "boft_block_size": 4, "boft_n_butterfly_factor": 2},
    "boft-three-factors": {
        "peft_type": "BOFT",
        "boft_block_size": 2,
        "boft_n_butterfly_factor": 3,
        "modules_to_save": ["lm_head"],
    },
}


def tiny_llama() -> LlamaForCausalLM:
    return _tiny_llama(max_position_embeddings=32, attention_bias=True, mlp_bias=True)


def tokens() -> torch.Tensor:
    return torch.randint(0, 48, (3, 10), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def train(model: nn.Module, steps: int = 4) -> None:
    """Adam on the trainable tensors with the model's own language-modelling loss."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batch = torch.randint(0, 48, (4, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval()


def config_dict(case: str, targets: list[str] = TARGETS) -> dict[str, object]:
    return {"target_modules": targets, **CASES[case]}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def several_factors(case: str) -> bool:
    return int(CASES[case].get("boft_n_butterfly_factor", 1)) > 1  # type: ignore[call-overload]


def check_peft_factors(model: nn.Module, case: str) -> None:
    """PEFT must really have run ``m`` butterfly factors (it falls back to one without its extension)."""
    if CASES[case]["peft_type"] != "BOFT":
        return
    m = int(CASES[case].get("boft_n_butterfly_factor", 1))  # type: ignore[call-overload]
    shapes = {p.shape[0] for name, p in model.named_parameters() if name.endswith("boft_R.default")}
    assert shapes == {m}


@pytest.mark.parametrize("case", list(CASES))
def test_orthoft_adapter_loads_into_peft_and_transformers(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stand_in = peft_with_several_factors(monkeypatch) if several_factors(case) else None
    base = tiny_llama()
    reference = logits(base)
    model = get_orthoft_model(copy.deepcopy(base), OrthoftConfig.from_dict(config_dict(case)))
    train(model)
    expected = logits(model)
    assert max_diff(expected, reference) > MOVED
    save_adapter(model, tmp_path)

    peft_model = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    assert max_diff(logits(peft_model), expected) < TOLERANCE
    check_peft_factors(peft_model, case)

    with_adapter = copy.deepcopy(base)
    transformers_load_adapter(with_adapter, tmp_path, caplog)
    assert max_diff(logits(with_adapter), expected) < TOLERANCE
    assert stand_in is None or stand_in.calls > 0


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_into_orthoft(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = peft_with_several_factors(monkeypatch) if several_factors(case) else None
    base = tiny_llama()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.get_peft_config(config_dict(case)))
    check_peft_factors(peft_model, case)
    train(peft_model)
    expected = logits(peft_model)
    assert max_diff(expected, logits(base)) > MOVED
    assert stand_in is None or stand_in.calls > 0
    peft_model.save_pretrained(tmp_path)

    model = load_adapter(copy.deepcopy(base), tmp_path)
    assert max_diff(logits(model), expected) < TOLERANCE


# Two adapters on overlapping layers, with different methods' options.
NAMED = {
    "first": ("oft-neumann", ["q_proj", "v_proj"]),
    "second": ("oft-exact", ["q_proj", "o_proj", "up_proj"]),
}


def test_named_adapters_each_saved_and_loaded_on_their_own(tmp_path: Path) -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    expected: dict[str, torch.Tensor] = {}
    for name, (case, targets) in NAMED.items():
        get_orthoft_model(model, OrthoftConfig.from_dict(config_dict(case, targets)), name)
        set_adapter(model, name)
        train(model)
        expected[name] = logits(model)
        save_adapter(model, tmp_path / "orthoft" / name, adapter_name=name)
    assert max_diff(expected["first"], expected["second"]) > MOVED

    peft_model = peft_from_pretrained(copy.deepcopy(base), tmp_path / "orthoft" / "first", "first")
    result = peft_model.load_adapter(tmp_path / "orthoft" / "second", "second")
    assert not result.missing_keys and not result.unexpected_keys
    for name in NAMED:
        peft_model.set_adapter(name)
        assert max_diff(logits(peft_model), expected[name]) < TOLERANCE


def test_named_peft_adapters_load_into_orthoft_each_on_their_own(tmp_path: Path) -> None:
    base = tiny_llama()
    peft_model: peft.PeftModel | None = None
    expected: dict[str, torch.Tensor] = {}
    for name, (case, targets) in NAMED.items():
        config = peft.get_peft_config(config_dict(case, targets))
        if peft_model is None:
            peft_model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        peft_model.set_adapter(name)
        train(peft_model)
        expected[name] = logits(peft_model)
    assert peft_model is not None
    # PEFT writes each adapter but "default" into a folder of its name.
    peft_model.save_pretrained(tmp_path)

    model = copy.deepcopy(base)
    for name in NAMED:
        load_adapter(model, tmp_path / name, adapter_name=name)
    for name in NAMED:
        set_adapter(model, name)
        assert max_diff(logits(model), expected[name]) < TOLERANCE
