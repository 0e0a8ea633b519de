"""Saving and loading adapters: exact round trips, strict loading, PEFT-saved adapters."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from orthoft.adapter_io import adapter_state_dict, load_adapter, save_adapter
from orthoft.config import BOFTConfig, OFTConfig, OrthoftConfig
from orthoft.tuner import active_adapters, get_orthoft_model, named_orthoft_layers, set_adapter

# PEFT's BOFT warns on CPU that its CUDA extension is missing.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Failed to load the CUDA extension", "ignore:Setting boft_n_butterfly_factor to 1"
)


class Net(nn.Module):
    """Two blocks of q (with bias) and v (without), a LayerNorm and a head, in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(16, 16), "v": nn.Linear(16, 16, bias=False)}) for _ in range(2)
        )
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer["q"](x)) + layer["v"](x)
        return self.head(self.norm(x))


def perturb_trainable(model: nn.Module) -> None:
    """Stand-in for training: move every trainable tensor."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn_like(parameter))


def inputs() -> torch.Tensor:
    return torch.randn(6, 16, dtype=torch.float64)


def keys_of(path: Path) -> set[str]:
    return set(load_file(path / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("config", "expected_keys"),
    [
        (
            OFTConfig(target_modules=["q", "v"], oft_block_size=4, bias="oft_only", modules_to_save=["head"]),
            {f"layers.{i}.{name}.oft_R.weight" for i in (0, 1) for name in ("q", "v")}
            | {"layers.0.q.base_layer.bias", "layers.1.q.base_layer.bias", "head.weight", "head.bias"},
        ),
        (
            OFTConfig(
                target_modules=["v"], r=2, oft_block_size=0, coft=True, eps=1e-2, use_cayley_neumann=False
            ),
            {"layers.0.v.oft_R.weight", "layers.1.v.oft_R.weight"},
        ),
        (
            BOFTConfig(
                target_modules=r"layers\.\d\.q", boft_block_size=2, boft_n_butterfly_factor=3, bias="all"
            ),
            {f"layers.{i}.q.{name}" for i in (0, 1) for name in ("boft_R", "boft_s", "base_layer.bias")}
            | {"norm.bias", "head.bias"},
        ),
    ],
)
def test_round_trip_reproduces_outputs_exactly(
    tmp_path: Path, config: OrthoftConfig, expected_keys: set[str]
) -> None:
    original = Net()
    model = get_orthoft_model(copy.deepcopy(original), config)
    perturb_trainable(model)
    x = inputs()
    expected = model(x)

    save_adapter(model, tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    assert keys_of(tmp_path) == expected_keys
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == config.peft_type
    assert OrthoftConfig.from_dict(saved_config) == config

    loaded = load_adapter(copy.deepcopy(original), tmp_path)
    assert torch.equal(loaded(x), expected)


def test_only_the_named_adapter_is_saved_and_it_loads_under_any_name(tmp_path: Path) -> None:
    original = Net()
    model = get_orthoft_model(copy.deepcopy(original), BOFTConfig(target_modules=["q", "v"]), "a")
    get_orthoft_model(model, BOFTConfig(target_modules=["q"], boft_block_num=4, boft_block_size=0), "b")
    set_adapter(model, "b")
    perturb_trainable(model)
    x = inputs()
    expected = model(x)
    save_adapter(model, tmp_path, adapter_name="b")
    assert keys_of(tmp_path) == {f"layers.{i}.q.{name}" for i in (0, 1) for name in ("boft_R", "boft_s")}

    # Into a model that already carries another adapter: added, inactive until set.
    other = get_orthoft_model(
        copy.deepcopy(original), BOFTConfig(target_modules=["q"], boft_block_size=2), "a"
    )
    load_adapter(other, tmp_path, adapter_name="restored")
    assert active_adapters(other) == ["a"]
    set_adapter(other, "restored")
    assert torch.equal(other(x), expected)
    saved = adapter_state_dict(model, "b")
    assert all(torch.equal(saved[key], value) for key, value in adapter_state_dict(other, "restored").items())


def rewrite(path: Path, edit: dict[str, torch.Tensor | None]) -> None:
    """Replace (tensor) or drop (None) keys of a saved adapter."""
    tensors = load_file(path / "adapter_model.safetensors")
    for key, value in edit.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, path / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            {"layers.1.q.oft_R.weight": None},
            r"missing keys \[layers\.1\.q\.oft_R\.weight\], unexpected keys \[\]",
        ),
        ({"layers.2.q.oft_R.weight": torch.ones(4, 6)}, r"unexpected keys \[layers\.2\.q\.oft_R\.weight\]"),
        (
            {"layers.0.q.oft_R.weight": torch.ones(2, 28)},
            r"'layers\.0\.q\.oft_R\.weight' .* shape \(2, 28\), .*\(4, 6\)",
        ),
    ],
)
def test_loading_is_strict_and_leaves_the_model_unchanged_on_error(
    tmp_path: Path, edit: dict[str, torch.Tensor | None], match: str
) -> None:
    original = Net()
    model = get_orthoft_model(copy.deepcopy(original), OFTConfig(target_modules=["q"], oft_block_size=4))
    save_adapter(model, tmp_path)
    rewrite(tmp_path, edit)
    fresh = copy.deepcopy(original)
    modules = dict(fresh.named_modules())
    with pytest.raises(ValueError, match=match):
        load_adapter(fresh, tmp_path)
    assert dict(fresh.named_modules()) == modules
    assert all(parameter.requires_grad for parameter in fresh.parameters())


def test_loading_needs_a_new_name_and_a_safetensors_file(tmp_path: Path) -> None:
    model = get_orthoft_model(Net(), OFTConfig(target_modules=["q"], oft_block_size=4))
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"has no adapter 'other'; it has \['default'\]"):
        save_adapter(model, tmp_path, adapter_name="other")
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(
        FileNotFoundError, match=r"found \['adapter_model\.bin'\]; only safetensors files are read"
    ):
        load_adapter(Net(), tmp_path)


@pytest.mark.parametrize(
    "peft_config",
    [
        peft.OFTConfig(target_modules=["q", "v"], oft_block_size=4, init_weights=False),
        peft.OFTConfig(
            target_modules=["q"], r=2, oft_block_size=0, use_cayley_neumann=False, bias="oft_only"
        ),
        peft.OFTConfig(target_modules=["v"], oft_block_size=8, block_share=True, modules_to_save=["head"]),
        peft.BOFTConfig(target_modules=["q", "v"], boft_block_size=4, init_weights=False),
        peft.BOFTConfig(
            target_modules=["q"], boft_block_num=2, boft_block_size=0, bias="all", modules_to_save=["head"]
        ),
    ],
)
def test_loads_peft_saved_adapters(tmp_path: Path, peft_config: peft.PeftConfig) -> None:
    original = Net()
    peft_model = peft.get_peft_model(copy.deepcopy(original), peft_config)
    perturb_trainable(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert all(key.startswith("base_model.model.") for key in keys_of(tmp_path))

    model = load_adapter(copy.deepcopy(original), tmp_path)
    assert len(named_orthoft_layers(model)) == len(peft_model.targeted_module_names)
    x = inputs()
    torch.testing.assert_close(model(x), peft_model(x), rtol=1e-12, atol=1e-12)
