"""What ``load_adapter`` refuses: non-finite values, non-float dtypes, damaged files, bad JSON, absurd
series lengths and regexes without a bound on their matching time. Each is an error naming the file and
the field or tensor, and the model is left exactly as it was."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import orthoft
from orthoft.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from orthoft.config import OFTConfig
from orthoft.regex_bounds import check_bounded_regex
from orthoft.tuner import get_orthoft_model

from tiny_models import tiny_llama

BIAS_KEY = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
ROTATION_KEY = "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama(attention_bias=True)


@pytest.fixture
def saved(tmp_path: Path, base: torch.nn.Module) -> Path:
    """An OFT adapter with trained (random) rotations and q/v biases, as a trained one would be."""
    config = OFTConfig(target_modules=["q_proj", "v_proj"], oft_block_size=8, bias="oft_only")
    model = get_orthoft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    save_adapter(model, tmp_path)
    return tmp_path


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    assert "_orthoft_state" not in model.__dict__


def edit_tensor(directory: Path, key: str, value: torch.Tensor) -> None:
    tensors = load_file(directory / WEIGHTS_NAME)
    tensors[key] = value
    save_file(tensors, directory / WEIGHTS_NAME)


def refused(model: torch.nn.Module, directory: Path, error: type[Exception], match: str) -> None:
    before = state(model)
    with pytest.raises(error, match=match):
        load_adapter(model, directory)
    assert_unchanged(model, before)


@pytest.mark.parametrize("key", [ROTATION_KEY, BIAS_KEY])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_naming_file_and_tensor(
    saved: Path, base: torch.nn.Module, key: str, bad: float
) -> None:
    tensor = load_file(saved / WEIGHTS_NAME)[key].clone()
    tensor.view(-1)[3] = bad
    edit_tensor(saved, key, tensor)
    model = copy.deepcopy(base)
    refused(model, saved, ValueError, rf"adapter_model\.safetensors: tensor '{key}' holds 1 non-finite")
    # Forensic loading takes the values as they are.
    load_adapter(model, saved, allow_non_finite=True)
    loaded = model.state_dict()[key.removeprefix("base_model.model.").replace(".weight", ".default.weight")]
    assert torch.equal(loaded.isnan(), tensor.isnan()) and torch.equal(loaded.isinf(), tensor.isinf())


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
)
@pytest.mark.parametrize("key", [ROTATION_KEY, BIAS_KEY])
def test_non_float_tensors_are_refused(
    saved: Path, base: torch.nn.Module, dtype: torch.dtype, key: str
) -> None:
    tensor = load_file(saved / WEIGHTS_NAME)[key]
    edit_tensor(saved, key, (tensor * 10).to(dtype))
    match = rf"tensor '{key}' is {str(dtype).removeprefix('torch.')}; it must be one of float16, bfloat16"
    refused(copy.deepcopy(base), saved, TypeError, match)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_as_peft_saves_them(
    saved: Path, base: torch.nn.Module, dtype: torch.dtype
) -> None:
    tensors = {key: value.to(dtype) for key, value in load_file(saved / WEIGHTS_NAME).items()}
    save_file(tensors, saved / WEIGHTS_NAME)
    model = load_adapter(copy.deepcopy(base), saved)
    loaded = orthoft.adapter_io.adapter_state_dict(model)
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value.to(torch.float32))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\xff\xfe{}", r"adapter_config\.json is not UTF-8 text"),
        (b'{"peft_type": "OFT",', r"adapter_config\.json is not valid JSON"),
        (b"[1, 2]", r"adapter_config\.json must hold a JSON object of config fields, got a list"),
        (b"[" * 100_000 + b"]" * 100_000, r"adapter_config\.json nests JSON .* too deeply"),
    ],
)
def test_unreadable_config_files_name_the_file(
    saved: Path, base: torch.nn.Module, raw: bytes, match: str
) -> None:
    (saved / CONFIG_NAME).write_bytes(raw)
    refused(copy.deepcopy(base), saved, ValueError, match)


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        (
            "num_cayley_neumann_terms",
            10**7,
            ValueError,
            r"`num_cayley_neumann_terms` must be an integer >= 1 and "
            r"at most 64 .*got 10000000",
        ),
        ("oft_block_size", "8", ValueError, "`oft_block_size` must be an integer >= 0, got '8'"),
        ("target_modules", {"q": 1}, ValueError, "`target_modules` must be None, a regular expression"),
        ("target_modules", "(.*)*x", ValueError, r"`target_modules` '\(\.\*\)\*x' is rejected: it repeats"),
        ("exclude_modules", "(a|ab)*c", ValueError, r"`exclude_modules` .* is rejected: it repeats"),
        ("no_such_field", 1, ValueError, r"unknown fields \['no_such_field'\]"),
    ],
)
def test_invalid_config_fields_name_the_file_and_field(
    saved: Path, base: torch.nn.Module, field: str, value: object, error: type[Exception], match: str
) -> None:
    data = json.loads((saved / CONFIG_NAME).read_text())
    data[field] = value
    (saved / CONFIG_NAME).write_text(json.dumps(data))
    refused(copy.deepcopy(base), saved, error, rf"adapter_config\.json: .*{match}")


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],
        lambda raw: b"",
        lambda raw: (2**62).to_bytes(8, "little") + raw[8:],
        lambda raw: raw[:8] + b"\x00" * (len(raw) - 8),
        lambda raw: raw.replace(b'"F32"', b'"X99"'),
    ],
    ids=["truncated", "empty", "absurd-header-size", "zeroed-header", "unknown-dtype"],
)
def test_damaged_safetensors_files_name_the_file(saved: Path, base: torch.nn.Module, damage) -> None:
    path = saved / WEIGHTS_NAME
    path.write_bytes(damage(path.read_bytes()))
    refused(
        copy.deepcopy(base), saved, ValueError, r"adapter_model\.safetensors is not a readable safetensors"
    )


@pytest.mark.parametrize(
    "pattern",
    [
        r"(.*)*x",
        r"(a+)+$",
        r"(\w+\.)+q_proj",
        r"(a|ab)*c",
        r"(.*a){20}",
        r"(a+)\1",
        r".*.*.*.*x",
        r"(.*a)?(.*b)?(.*c)?(.*d)?x",
        "(ab|cd)" * 9,
    ],
)
def test_backtracking_regexes_are_rejected_up_front(base: torch.nn.Module, pattern: str) -> None:
    model = copy.deepcopy(base)
    before = state(model)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"OFTConfig: `target_modules` .* is rejected: .*bounded"):
        get_orthoft_model(model, OFTConfig(target_modules=pattern))
    assert time.perf_counter() - start < 1.0
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "pattern",
    [
        r".*\.(q_proj|v_proj)",
        r"model\.layers\.\d+\.self_attn\.\w+_proj",
        r".*layers\.[01]\..*_proj",
        r"(?:ab)*q",
        # A diffusion recipe: alternatives are tried one after another, so their repeats do not add up.
        r".*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*proj_in|.*proj_out|.*resnets\.\d+\.conv1",
    ],
)
def test_usual_regexes_are_accepted(pattern: str) -> None:
    check_bounded_regex("OFTConfig", "target_modules", pattern)


@pytest.mark.parametrize(
    ("pattern", "match"),
    [("(?<=a+)b", "look-behind requires fixed-width pattern"), ("[", "unterminated character set")],
)
def test_invalid_regexes_are_errors_naming_the_field(pattern: str, match: str) -> None:
    with pytest.raises(
        ValueError, match=rf"OFTConfig: `exclude_modules` .* is not a valid regular expression: {match}"
    ):
        OFTConfig(target_modules=["q_proj"], exclude_modules=pattern)


def test_layers_pattern_entries_are_checked_in_the_regex_they_are_matched_in() -> None:
    config = OFTConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["layers", "h"])
    assert config.layers_pattern == ["layers", "h"]
    with pytest.raises(
        ValueError, match=r"`layers_pattern` '\.\*a\.\*x' is rejected: it has 2 repeats .*at most 1"
    ):
        OFTConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["layers", ".*a.*x"])
