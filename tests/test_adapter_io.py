"""Saving and loading adapters: PEFT's layout, exact round trips, strict loading, PEFT-saved adapters and
orthoft's earlier layout."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from orthoft.adapter_io import PEFT_VERSION, adapter_state_dict, load_adapter, save_adapter
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


def peft_keys(*keys: str) -> set[str]:
    return {f"base_model.model.{key}" for key in keys}


@pytest.mark.parametrize(
    ("config", "expected_keys"),
    [
        (
            OFTConfig(target_modules=["q", "v"], oft_block_size=4, bias="oft_only", modules_to_save=["head"]),
            peft_keys(
                *(f"layers.{i}.{name}.oft_R.weight" for i in (0, 1) for name in ("q", "v")),
                *("layers.0.q.base_layer.bias", "layers.1.q.base_layer.bias", "head.weight", "head.bias"),
            ),
        ),
        (
            OFTConfig(
                target_modules=["v"], r=2, oft_block_size=0, coft=True, eps=1e-2, use_cayley_neumann=False
            ),
            peft_keys("layers.0.v.oft_R.weight", "layers.1.v.oft_R.weight"),
        ),
        (
            BOFTConfig(
                target_modules=r"layers\.\d\.q", boft_block_size=2, boft_n_butterfly_factor=3, bias="all"
            ),
            peft_keys(
                *(f"layers.{i}.q.{name}" for i in (0, 1) for name in ("boft_R", "boft_s", "base_layer.bias")),
                *("norm.bias", "head.bias"),
            ),
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
    assert saved_config["peft_version"] == PEFT_VERSION
    assert saved_config["inference_mode"] is True
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
    assert keys_of(tmp_path) == peft_keys(
        *(f"layers.{i}.q.{name}" for i in (0, 1) for name in ("boft_R", "boft_s"))
    )

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
            {"base_model.model.layers.1.q.oft_R.weight": None},
            r"missing keys \[base_model\.model\.layers\.1\.q\.oft_R\.weight\], unexpected keys \[\]",
        ),
        (
            {"base_model.model.layers.2.q.oft_R.weight": torch.ones(4, 6)},
            r"unexpected keys \[base_model\.model\.layers\.2\.q\.oft_R\.weight\]",
        ),
        (
            {"base_model.model.layers.0.q.oft_R.weight": torch.ones(2, 28)},
            r"'base_model\.model\.layers\.0\.q\.oft_R\.weight' .* shape \(2, 28\), .*\(4, 6\)",
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


def saved_layout(path: Path) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, object]]:
    """Keys with dtypes and shapes, and the config, of a saved adapter."""
    tensors = load_file(path / "adapter_model.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    return {key: (value.dtype, tuple(value.shape)) for key, value in tensors.items()}, config


@pytest.mark.parametrize(
    "options",
    [
        {"peft_type": "OFT", "target_modules": ["q", "v"], "oft_block_size": 4, "coft": True},
        {"peft_type": "OFT", "target_modules": ["q"], "r": 4, "oft_block_size": 0, "bias": "oft_only"},
        {
            "peft_type": "OFT",
            "target_modules": ["v"],
            "oft_block_size": 8,
            "bias": "all",
            "modules_to_save": ["head"],
        },
        {"peft_type": "BOFT", "target_modules": ["q", "v"], "boft_block_size": 2, "bias": "boft_only"},
        {"peft_type": "BOFT", "target_modules": ["q"], "bias": "all", "modules_to_save": ["head", "norm"]},
    ],
)
def test_writes_what_peft_writes_for_the_same_config(tmp_path: Path, options: dict[str, object]) -> None:
    """Second adapter of two, so that the other adapter's tensors must stay out, as PEFT leaves them."""
    original = Net()
    first = {"peft_type": options["peft_type"], "target_modules": ["q"]}
    if options["peft_type"] == "OFT":
        first["oft_block_size"] = 4
    peft_model = peft.get_peft_model(copy.deepcopy(original), peft.get_peft_config(first), "first")
    peft_model.add_adapter("second", peft.get_peft_config(options))
    peft_model.save_pretrained(tmp_path / "peft", selected_adapters=["second"])

    model = get_orthoft_model(copy.deepcopy(original), OrthoftConfig.from_dict(first), "first")
    get_orthoft_model(model, OrthoftConfig.from_dict(options), "second")
    save_adapter(model, tmp_path / "orthoft", adapter_name="second")

    peft_tensors, peft_config = saved_layout(tmp_path / "peft" / "second")
    tensors, config = saved_layout(tmp_path / "orthoft")
    assert tensors == peft_tensors
    assert config.pop("peft_version") == PEFT_VERSION
    del peft_config["peft_version"]
    # PEFT holds target_modules as a set and writes it in hash order.
    peft_config["target_modules"] = sorted(peft_config["target_modules"])
    assert config == peft_config


def test_reads_the_layout_orthoft_wrote_before(tmp_path: Path) -> None:
    """Earlier orthoft files: keys without ``base_model.model.``, the config's ``to_dict`` and no more."""
    original = Net()
    config = OFTConfig(target_modules=["q", "v"], oft_block_size=4, bias="oft_only", modules_to_save=["head"])
    model = get_orthoft_model(copy.deepcopy(original), config)
    perturb_trainable(model)
    x = inputs()
    tensors = {
        key.removeprefix("base_model.model."): value.detach().clone()
        for key, value in adapter_state_dict(model).items()
    }
    assert "layers.0.q.oft_R.weight" in tensors
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    )

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_adapter(copy.deepcopy(original), tmp_path)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    ("edit", "warns"),
    [
        ({"peft_version": "0.17.1"}, True),
        ({"peft_version": None}, True),
        ({"peft_version": "0.18.0"}, False),
        ({"peft_version": "0.17.1", "use_cayley_neumann": False}, False),
    ],
)
def test_warns_on_peft_adapters_from_before_the_new_neumann_series(
    tmp_path: Path, edit: dict[str, object], warns: bool
) -> None:
    model = get_orthoft_model(Net(), OFTConfig(target_modules=["q"], oft_block_size=4))
    save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data.update(edit)
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(Net(), tmp_path)
    assert any("Cayley-Neumann series" in str(w.message) for w in caught) == warns


def test_task_type_is_peft_s(tmp_path: Path) -> None:
    model = get_orthoft_model(Net(), BOFTConfig(target_modules=["q"]))
    save_adapter(model, tmp_path, task_type="CAUSAL_LM")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["task_type"], saved["auto_mapping"]) == ("CAUSAL_LM", None)
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path), peft.BOFTConfig)
    with pytest.raises(ValueError, match=r"task_type must be None or one of \(.*'CAUSAL_LM'.*\), got 'lm'"):
        save_adapter(model, tmp_path, task_type="lm")
