"""What ``load_adapter`` refuses in a LyCORIS or kohya file, as in a PEFT adapter: NaN or Inf values (unless
``allow_non_finite``), integer, bool and float8 tensors, a missing or odd ``alpha``, damaged or missing
files. Each is an error naming the file and the key, and the model is left exactly as it was; float16,
bfloat16 and float64 tensors load, as LyCORIS itself reads them."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import orthoft
from orthoft.layers import LycorisConv2d, LycorisLinear

from lycoris_helpers import SmallNet, quiet_lycoris, small_inputs

lycoris = pytest.importorskip("lycoris")


@pytest.fixture
def base() -> torch.nn.Module:
    return SmallNet()


@pytest.fixture
def saved(tmp_path: Path, base: torch.nn.Module) -> Path:
    """A diag-OFT file with random (trained-like) blocks, rescale and a constraint on fc1, conv and fc2."""
    config = orthoft.LycorisConfig(
        target_modules=["fc1", "conv", "fc2"],
        block_size=4,
        constraint=0.01,
        rescaled=True,
        init_weights=False,
    )
    path = tmp_path / "adapter.safetensors"
    orthoft.save_adapter(orthoft.get_orthoft_model(copy.deepcopy(base), config), path)
    return path


def _edited(path: Path, **tensors: torch.Tensor | None) -> Path:
    """``path`` with the tensors named (``lycoris_conv__alpha`` for ``lycoris_conv.alpha``) set or dropped."""
    content = load_file(path)
    for name, value in tensors.items():
        key = name.replace("__", ".")
        if value is None:
            del content[key]
        else:
            content[key] = value
    save_file(content, path)
    return path


def _refused(model: torch.nn.Module, path: Path, error: type[Exception], message: str) -> None:
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(error, match=re.escape(str(path)) + ".*" + message):
        orthoft.load_adapter(model, path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert type(model.fc1) is torch.nn.Linear and type(model.conv) is torch.nn.Conv2d
    assert "_orthoft_state" not in model.__dict__


def _lycoris_output(base: torch.nn.Module, path: Path, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    quiet_lycoris()
    model = copy.deepcopy(base)
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    network.apply_to()
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("part", ["oft_blocks", "rescale"])
def test_non_finite_values_need_allow_non_finite(
    base: torch.nn.Module, saved: Path, part: str, value: float
) -> None:
    key = f"lycoris_conv.{part}"
    tensor = load_file(saved)[key]
    tensor.view(-1)[3] = value
    _edited(saved, **{key.replace(".", "__"): tensor})
    _refused(base, saved, ValueError, rf"tensor '{key}' holds 1 non-finite values.*allow_non_finite=True")
    model = orthoft.load_adapter(copy.deepcopy(base), saved, allow_non_finite=True)
    assert isinstance(model.conv, LycorisConv2d)
    loaded = getattr(model.conv.lycoris["default"], part)
    torch.testing.assert_close(
        loaded.detach().reshape(-1), tensor.reshape(-1), atol=0, rtol=0, equal_nan=True
    )


def test_non_finite_alpha_needs_allow_non_finite(base: torch.nn.Module, saved: Path) -> None:
    _edited(saved, lycoris_fc2__alpha=torch.tensor(float("inf")))
    _refused(base, saved, ValueError, r"tensor 'lycoris_fc2.alpha' holds 1 non-finite")
    model = orthoft.load_adapter(copy.deepcopy(base), saved, allow_non_finite=True)
    assert model.fc2.adapter_options["default"].constraint == float("inf")  # no constraint, as in LyCORIS


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
)
@pytest.mark.parametrize("part", ["oft_blocks", "rescale", "alpha"])
def test_non_float_tensors_are_type_errors(
    base: torch.nn.Module, saved: Path, part: str, dtype: torch.dtype
) -> None:
    key = f"lycoris_fc1.{part}"
    _edited(saved, **{key.replace(".", "__"): (load_file(saved)[key] * 4).to(dtype)})
    dtype_name = str(dtype).removeprefix("torch.")
    _refused(base, saved, TypeError, rf"tensor '{key}' is {dtype_name}; it must be one of float16, bfloat16")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_as_lycoris_reads_them(
    base: torch.nn.Module, saved: Path, dtype: torch.dtype
) -> None:
    cast = {key: value.to(dtype) for key, value in load_file(saved).items()}
    save_file(cast, saved)
    model = orthoft.load_adapter(copy.deepcopy(base), saved)
    assert (
        isinstance(model.fc1, LycorisLinear)
        and model.fc1.lycoris["default"].oft_blocks.dtype == torch.float32
    )
    assert torch.equal(model.fc1.lycoris["default"].oft_blocks, cast["lycoris_fc1.oft_blocks"].float())
    inputs = small_inputs()
    with torch.no_grad():
        out = model(*inputs)
        assert not torch.allclose(out, base(*inputs), atol=1e-3)
        torch.testing.assert_close(out, _lycoris_output(base, saved, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("alpha", "error", "message"),
    [
        (None, ValueError, r"module 'lycoris_conv' has no lycoris_conv.alpha .*add lycoris_conv.alpha = 0"),
        (
            torch.tensor([0.01]),
            ValueError,
            r"lycoris_conv.alpha has shape \(1,\); expected one value of shape \(\)",
        ),
        (torch.zeros(2), ValueError, r"lycoris_conv.alpha has shape \(2,\)"),
        (torch.tensor(-0.5), ValueError, r"lycoris_conv.alpha is -0.5; the constraint must be a number >= 0"),
        (torch.tensor(float("nan")), ValueError, r"tensor 'lycoris_conv.alpha' holds 1 non-finite"),
    ],
)
def test_alpha_must_be_one_number_at_least_zero(
    base: torch.nn.Module, saved: Path, alpha: torch.Tensor | None, error: type[Exception], message: str
) -> None:
    _refused(base, _edited(saved, lycoris_conv__alpha=alpha), error, message)


def test_nan_alpha_is_refused_even_with_allow_non_finite(base: torch.nn.Module, saved: Path) -> None:
    _edited(saved, lycoris_conv__alpha=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match=r"lycoris_conv.alpha is nan; the constraint must be a number >= 0"):
        orthoft.load_adapter(base, saved, allow_non_finite=True)
    assert type(base.conv) is torch.nn.Conv2d


@pytest.mark.parametrize("size", [2, 4, 8, 4**3])
def test_damaged_files_are_value_errors_naming_them(base: torch.nn.Module, saved: Path, size: int) -> None:
    saved.write_bytes(saved.read_bytes()[:size])
    _refused(base, saved, ValueError, r"is not a readable safetensors file")


def test_missing_file_and_odd_blocks_name_the_file(
    base: torch.nn.Module, saved: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.safetensors"
    _refused(base, missing, FileNotFoundError, r"does not exist")
    _edited(saved, lycoris_fc2__oft_blocks=torch.zeros(4, 4, 1))
    _refused(
        base, saved, ValueError, r"lycoris_fc2.oft_blocks has shape \(4, 4, 1\).*blocks b x b with b >= 2"
    )
