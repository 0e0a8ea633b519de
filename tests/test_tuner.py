"""Configs and the module-replacement tuner: matching, freezing, several adapters, merge and unload."""

from __future__ import annotations

import copy
import dataclasses
import json

import peft
import pytest
import torch
from torch import nn

from orthoft.config import BOFTConfig, OFTConfig, OrthoftConfig
from orthoft.layers import BOFTLinear, OFTLinear, OrthoftLayer
from orthoft.tuner import (
    ModulesToSaveWrapper,
    active_adapters,
    adapter_configs,
    delete_adapter,
    disable_adapters,
    get_nb_trainable_parameters,
    get_orthoft_model,
    layer_adapter_names,
    merge_and_unload,
    named_orthoft_layers,
    print_trainable_parameters,
    set_adapter,
    unload,
)

DIM, HIDDEN = 16, 24


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(DIM, DIM)
        self.v = nn.Linear(DIM, DIM, bias=False)
        self.mlp = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.v(x) * torch.sigmoid(self.q(x)) + self.mlp(x)


class TinyNet(nn.Module):
    """Embedding, a stack of blocks, LayerNorm and a head, in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x)
        return self.head(self.norm(x))

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def make_model() -> TinyNet:
    model = TinyNet().double()
    with torch.no_grad():
        for parameter in model.parameters():  # LayerNorm starts at exactly 1 and 0: make it matter
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, 11, (3, 7))


def randomize_adapters(model: nn.Module, scale: float = 0.2) -> None:
    """Move every adapter tensor away from its identity initialisation."""
    with torch.no_grad():
        for _, layer in named_orthoft_layers(model):
            for attribute in layer.adapter_parameter_names:
                for parameter in getattr(layer, attribute).parameters():
                    parameter.add_(scale * torch.randn_like(parameter))


def wrapped_paths(model: nn.Module) -> list[str]:
    return [path for path, _ in named_orthoft_layers(model)]


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


OFT = OFTConfig(target_modules=["q", "v"], oft_block_size=4)


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(("ours", "theirs"), [(OFTConfig, peft.OFTConfig), (BOFTConfig, peft.BOFTConfig)])
def test_config_fields_and_defaults_are_peft_s(ours: type[OrthoftConfig], theirs: type) -> None:
    peft_defaults = {field.name: field.default for field in dataclasses.fields(theirs)}
    # PEFT has target_parameters for LoRA only; orthoft takes it for OFT and BOFT, with LoRA's default.
    peft_defaults["target_parameters"] = peft.LoraConfig.__dataclass_fields__["target_parameters"].default
    for field in dataclasses.fields(ours):
        assert field.name in peft_defaults, field.name
        assert field.default == peft_defaults[field.name], field.name
    assert ours.peft_type == theirs().peft_type.value


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (OFTConfig, {"r": 4, "oft_block_size": 8}, r"exactly one of `r` \(4\) and `oft_block_size` \(8\)"),
        (OFTConfig, {"r": 0, "oft_block_size": 0}, "exactly one of `r`"),
        (OFTConfig, {"oft_block_size": 1}, "`oft_block_size` must be >= 2"),
        (OFTConfig, {"module_dropout": 1.5}, r"`module_dropout` must be a probability in \[0, 1\], got 1.5"),
        (OFTConfig, {"eps": -1.0}, "`eps` must be a positive number, got -1.0"),
        (OFTConfig, {"coft": 1}, "`coft` must be True or False, got 1"),
        (OFTConfig, {"num_cayley_neumann_terms": 0}, "`num_cayley_neumann_terms` must be an integer >= 1"),
        (OFTConfig, {"bias": "lora_only"}, r"`bias` must be one of \('none', 'all', 'oft_only'\)"),
        (BOFTConfig, {"bias": "oft_only"}, r"\('none', 'all', 'boft_only'\), got 'oft_only'"),
        (BOFTConfig, {"boft_block_size": 0}, "exactly one of `boft_block_size` \\(0\\) and `boft_block_num`"),
        (BOFTConfig, {"boft_block_num": 4}, "exactly one of `boft_block_size` \\(4\\)"),
        (BOFTConfig, {"boft_block_size": 5, "boft_n_butterfly_factor": 2}, "must be even.*got 5.*4 or 6"),
        (BOFTConfig, {"boft_n_butterfly_factor": 0}, "`boft_n_butterfly_factor` must be an integer >= 1"),
        (BOFTConfig, {"layers_pattern": "layers"}, "`layers_pattern` .* needs `layers_to_transform`"),
        (BOFTConfig, {"target_modules": "q", "layers_to_transform": 1}, "cannot be combined with a regex"),
        (BOFTConfig, {"target_modules": "q(("}, "not a valid regular expression"),
        (BOFTConfig, {"target_modules": 3}, "`target_modules` must be None, a regular expression"),
        (
            BOFTConfig,
            {"layers_to_transform": [0, -1]},
            "`layers_to_transform` must be an integer >= 0, got -1",
        ),
        (BOFTConfig, {"modules_to_save": "head"}, "`modules_to_save` must be a list of module names"),
    ],
)
def test_config_rejects_invalid_values(cls: type[OrthoftConfig], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "config",
    [
        OFTConfig(
            target_modules={"v", "q"},
            r=4,
            oft_block_size=0,
            coft=True,
            bias="oft_only",
            modules_to_save=["head"],
        ),
        BOFTConfig(target_modules=r".*\.q", boft_block_num=2, boft_block_size=0, boft_n_butterfly_factor=2),
        BOFTConfig(target_modules=["q"], layers_to_transform=[1], layers_pattern="layers", bias="all"),
    ],
)
def test_config_json_round_trip(config: OrthoftConfig) -> None:
    data = json.loads(json.dumps(config.to_dict()))
    assert data["peft_type"] == config.peft_type
    assert OrthoftConfig.from_dict(data) == config
    assert type(config).from_dict(data) == config


def test_config_from_dict_rejects_unknown_fields_and_wrong_type() -> None:
    data = OFT.to_dict()
    with pytest.raises(ValueError, match=r"unknown fields \['lora_alpha'\]"):
        OrthoftConfig.from_dict({**data, "lora_alpha": 8})
    with pytest.raises(ValueError, match="`peft_type` is 'OFT', expected 'BOFT'"):
        BOFTConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"`peft_type` must be one of \['BOFT', 'OFT'\], got 'LORA'"):
        OrthoftConfig.from_dict({**data, "peft_type": "LORA"})


def test_config_from_peft() -> None:
    theirs = peft.OFTConfig(target_modules=["q"], oft_block_size=8, coft=True, eps=1e-3, bias="oft_only")
    assert OrthoftConfig.from_peft(theirs) == OFTConfig(
        target_modules=["q"], oft_block_size=8, coft=True, eps=1e-3, bias="oft_only"
    )
    theirs = peft.BOFTConfig(
        target_modules="q", boft_block_size=2, boft_n_butterfly_factor=3, boft_dropout=0.1
    )
    assert BOFTConfig.from_peft(theirs) == BOFTConfig(
        target_modules="q", boft_block_size=2, boft_n_butterfly_factor=3, boft_dropout=0.1
    )


# ---------------------------------------------------------------------------------------------
# Matching


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (OFTConfig(target_modules=["q", "mlp.0"], oft_block_size=4), ["0.q", "0.mlp.0", "1.q", "1.mlp.0"]),
        (BOFTConfig(target_modules=r"layers\.1\.(q|mlp\.2)"), ["1.q", "1.mlp.2"]),
        (
            OFTConfig(target_modules=["q", "v"], exclude_modules=["1.v"], oft_block_size=4),
            ["0.q", "0.v", "1.q"],
        ),
        (
            OFTConfig(target_modules=["q", "v"], exclude_modules=r".*0\.v", oft_block_size=4),
            ["0.q", "1.q", "1.v"],
        ),
        (BOFTConfig(target_modules=["v"], layers_to_transform=1), ["1.v"]),
        (BOFTConfig(target_modules=["v"], layers_to_transform=[0], layers_pattern="layers"), ["0.v"]),
    ],
)
def test_targets_select_modules_as_peft_does(config: OrthoftConfig, expected: list[str]) -> None:
    model = get_orthoft_model(make_model(), config)
    assert wrapped_paths(model) == [f"layers.{path}" for path in expected]


def test_layers_pattern_must_name_the_layer_stack() -> None:
    config = BOFTConfig(target_modules=["v"], layers_to_transform=[0], layers_pattern="blocks")
    with pytest.raises(ValueError, match=r"matches no module"):
        get_orthoft_model(make_model(), config)


def test_all_linear_skips_the_output_layer() -> None:
    model = get_orthoft_model(make_model(), OFTConfig(target_modules="all-linear", oft_block_size=4))
    assert len(wrapped_paths(model)) == 8
    assert isinstance(model.head, nn.Linear)


def test_regex_must_match_the_whole_path() -> None:
    with pytest.raises(ValueError, match=r"matches no module of TinyNet; adaptable .*'layers\.0\.q'"):
        get_orthoft_model(make_model(), OFTConfig(target_modules="q", oft_block_size=4))


def test_unmatched_targets_name_existing_modules() -> None:
    with pytest.raises(ValueError, match=r"target_modules=\['query'\].*'layers\.0\.mlp\.2', 'layers\.1\.q'"):
        get_orthoft_model(make_model(), OFTConfig(target_modules=["query"], oft_block_size=4))


@pytest.mark.parametrize(
    ("targets", "path", "type_name"),
    # nn.Embedding is adapted since OFTEmbedding/BOFTEmbedding exist (tests/test_embedding.py).
    [(["q", "norm"], "norm", "LayerNorm"), (["head", "layers.0.mlp.1"], "layers.0.mlp.1", "GELU")],
)
def test_unsupported_modules_raise_type_error(targets: list[str], path: str, type_name: str) -> None:
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        TypeError, match=rf"Module '{path}' \(torch\.nn\.modules\.\w+\.{type_name}\).*exclude_modules"
    ):
        get_orthoft_model(model, OFTConfig(target_modules=targets, oft_block_size=4))
    assert not wrapped_paths(model)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_excluded_unsupported_modules_are_skipped() -> None:
    config = OFTConfig(target_modules=["q", "norm"], exclude_modules=["norm"], oft_block_size=4)
    model = get_orthoft_model(make_model(), config)
    assert wrapped_paths(model) == ["layers.0.q", "layers.1.q"]
    assert isinstance(model.norm, nn.LayerNorm)


def test_bad_layer_options_name_the_module_and_change_nothing() -> None:
    model = make_model()
    modules = dict(model.named_modules())
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    # Fits q and mlp.0 (16 inputs), then fails on mlp.2 (24 inputs).
    config = OFTConfig(target_modules=["q", "mlp.0", "mlp.2"], oft_block_size=16)
    with pytest.raises(
        ValueError, match=r"OFTLinear 'layers\.0\.mlp\.2'.*block_size=16.*near 16: 6, 8, 12, 24"
    ):
        get_orthoft_model(model, config)
    assert dict(model.named_modules()) == modules
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags

    get_orthoft_model(model, OFTConfig(target_modules=["q"], oft_block_size=4), "first")
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.2'"):
        get_orthoft_model(model, config, "second")
    assert all(layer_adapter_names(layer) == ["first"] for _, layer in named_orthoft_layers(model))
    assert list(adapter_configs(model)) == ["first"]
    assert trainable_names(model) == {"layers.0.q.oft_R.first.weight", "layers.1.q.oft_R.first.weight"}


def test_invalid_calls_raise() -> None:
    model = get_orthoft_model(make_model(), OFT)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        get_orthoft_model(model, OFT)
    with pytest.raises(ValueError, match=r"adapter_name must be a non-empty string without '\.'"):
        get_orthoft_model(model, OFT, "a.b")
    with pytest.raises(TypeError, match="config must be an orthoft OFTConfig or BOFTConfig"):
        get_orthoft_model(model, peft.OFTConfig(target_modules=["q"]), "other")
    with pytest.raises(ValueError, match="target_modules is None"):
        get_orthoft_model(model, OFTConfig(), "other")
    with pytest.raises(ValueError, match=r"'layers\.0\.q' is a OFTLinear .*a BOFT adapter cannot be added"):
        get_orthoft_model(model, BOFTConfig(target_modules=["q"]), "other")
    with pytest.raises(ValueError, match=r"Unknown adapters \['nope'\]; the model has \['default'\]"):
        set_adapter(model, "nope")
    with pytest.raises(ValueError, match="has no orthoft adapters"):
        set_adapter(make_model(), "default")
    with pytest.raises(ValueError, match=r"modules_to_save entries \['classifier'\] match no module"):
        get_orthoft_model(model, OFTConfig(target_modules=["v"], modules_to_save=["classifier"]), "other")


def test_linear_layout_mismatch_warns() -> None:
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=True in the config, but \['layers\.0\.q'"):
        get_orthoft_model(
            make_model(), OFTConfig(target_modules=["q"], oft_block_size=4, fan_in_fan_out=True)
        )


def test_a_module_shared_by_two_paths_is_wrapped_once() -> None:
    shared = nn.Linear(8, 8).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    get_orthoft_model(model, BOFTConfig(target_modules=["0", "2"], boft_block_size=2))
    assert isinstance(model[0], BOFTLinear)
    assert model[0] is model[2]
    assert model[0].base_layer is shared


# ---------------------------------------------------------------------------------------------
# Freezing


@pytest.mark.parametrize(
    ("bias", "extra"),
    [
        ("none", set()),
        ("oft_only", {"layers.0.q.base_layer.bias", "layers.1.q.base_layer.bias"}),
        (
            "all",
            {f"layers.{i}.{name}.bias" for i in (0, 1) for name in ("q.base_layer", "mlp.0", "mlp.2")}
            | {"norm.bias"},
        ),
    ],
)
def test_only_adapters_allowed_biases_and_modules_to_save_train(bias: str, extra: set[str]) -> None:
    config = OFTConfig(target_modules=["q", "v"], oft_block_size=4, bias=bias, modules_to_save=["head"])
    model = get_orthoft_model(make_model(), config)
    adapters = {f"layers.{i}.{name}.oft_R.default.weight" for i in (0, 1) for name in ("q", "v")}
    head = {"head.modules_to_save.default.weight", "head.modules_to_save.default.bias"}
    assert trainable_names(model) == adapters | head | extra
    assert isinstance(model.head, ModulesToSaveWrapper)
    assert model.head.out_features == 5  # attributes read through the wrapper


def test_trainable_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    model = get_orthoft_model(make_model(), BOFTConfig(target_modules=["q"], boft_block_size=4))
    trainable, total = get_nb_trainable_parameters(model)
    # Per q layer: boft_R (1, 4, 4, 4) and boft_s (16, 1).
    assert trainable == 2 * (64 + 16)
    assert total == sum(parameter.numel() for parameter in model.parameters())
    print_trainable_parameters(model)
    assert capsys.readouterr().out == f"trainable params: 160 || all params: {total:,d} || trainable%: " + (
        f"{100 * 160 / total:.4f}\n"
    )


# ---------------------------------------------------------------------------------------------
# Several adapters


def two_adapter_model() -> tuple[TinyNet, TinyNet]:
    """A model with adapters "a" (q, v: OFT) and "b" (q only: OFT, other options), randomised."""
    original = make_model()
    model = get_orthoft_model(copy.deepcopy(original), OFT, "a")
    get_orthoft_model(
        model, OFTConfig(target_modules=["q"], r=2, oft_block_size=0, use_cayley_neumann=False), "b"
    )
    randomize_adapters(model)
    return original, model


def test_added_adapters_stay_inactive_until_set() -> None:
    _, model = two_adapter_model()
    x = tokens()
    assert active_adapters(model) == ["a"]
    assert layer_adapter_names(model.layers[0].q) == ["a", "b"]
    assert layer_adapter_names(model.layers[0].v) == ["a"]
    assert all(name.split(".")[-2] == "a" for name in trainable_names(model))
    out_a = model(x)

    set_adapter(model, "b")
    out_b = model(x)
    assert trainable_names(model) == {"layers.0.q.oft_R.b.weight", "layers.1.q.oft_R.b.weight"}
    assert model.layers[0].v.active_adapters == []
    assert not torch.allclose(out_a, out_b)

    set_adapter(model, ["a", "b"])
    out_ab = model(x)
    assert len(trainable_names(model)) == 6
    assert not torch.allclose(out_ab, out_a) and not torch.allclose(out_ab, out_b)

    set_adapter(model, "a")
    torch.testing.assert_close(model(x), out_a, rtol=0, atol=0)
    merged = merge_and_unload(copy.deepcopy(model).requires_grad_(False), ["a", "b"])
    torch.testing.assert_close(merged(x), out_ab, rtol=1e-10, atol=1e-12)


def test_set_adapter_unmerges_merged_layers() -> None:
    _, model = two_adapter_model()
    x = tokens()
    out_a = model(x)
    set_adapter(model, "b")
    out_b = model(x)
    set_adapter(model, "a")
    for _, layer in named_orthoft_layers(model):
        layer.merge()
    torch.testing.assert_close(model(x), out_a, rtol=1e-10, atol=1e-12)
    with pytest.warns(UserWarning, match=r"unmerging the merged layers \['layers\.0\.q', 'layers\.0\.v'"):
        set_adapter(model, "b")
    assert not any(layer.merged for _, layer in named_orthoft_layers(model))
    torch.testing.assert_close(model(x), out_b, rtol=0, atol=0)


def test_delete_adapter() -> None:
    original, model = two_adapter_model()
    x = tokens()
    set_adapter(model, "b")
    out_b = model(x)
    delete_adapter(model, "a")
    assert list(adapter_configs(model)) == ["b"]
    assert active_adapters(model) == ["b"]
    assert type(model.layers[0].v) is nn.Linear  # held only "a": back to its base module
    assert wrapped_paths(model) == ["layers.0.q", "layers.1.q"]
    torch.testing.assert_close(model(x), out_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Unknown adapters \['a'\]"):
        delete_adapter(model, "a")

    delete_adapter(model, "b")
    assert not wrapped_paths(model)
    assert all(parameter.requires_grad for parameter in model.parameters())
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


def test_deleting_the_active_adapter_activates_the_first_remaining() -> None:
    _, model = two_adapter_model()
    delete_adapter(model, "a")
    assert active_adapters(model) == ["b"]
    assert trainable_names(model) == {"layers.0.q.oft_R.b.weight", "layers.1.q.oft_R.b.weight"}


def test_disable_adapters_gives_the_base_model() -> None:
    original, model = two_adapter_model()
    x = tokens()
    set_adapter(model, ["a", "b"])
    adapted = model(x)
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    with disable_adapters(model):
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags


def test_modules_to_save_hold_one_copy_per_adapter() -> None:
    original = make_model()
    model = get_orthoft_model(
        copy.deepcopy(original),
        OFTConfig(target_modules=["q"], oft_block_size=4, modules_to_save=["head"]),
        "a",
    )
    get_orthoft_model(model, OFTConfig(target_modules=["v"], oft_block_size=8, modules_to_save=["head"]), "b")
    with torch.no_grad():
        model.head.modules_to_save["a"].bias.add_(1.0)
        model.head.modules_to_save["b"].bias.sub_(1.0)
    x = tokens()
    out_a = model(x)
    torch.testing.assert_close(out_a, original(x) + 1.0, rtol=1e-12, atol=1e-12)
    set_adapter(model, "b")
    torch.testing.assert_close(model(x), original(x) - 1.0, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"Adapters \['a', 'b'\] each have their own copy of 'head'"):
        set_adapter(model, ["a", "b"])
    assert active_adapters(model) == ["b"]
    with disable_adapters(model):
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)

    merged = merge_and_unload(copy.deepcopy(model), ["a"])
    assert type(merged.head) is nn.Linear
    torch.testing.assert_close(merged(x), out_a, rtol=1e-12, atol=1e-12)
    unload(model)
    assert type(model.head) is nn.Linear
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Merging and unloading


@pytest.mark.parametrize(
    "config",
    [OFT, BOFTConfig(target_modules=["q", "mlp.0", "mlp.2"], boft_block_size=2, boft_n_butterfly_factor=3)],
)
def test_merge_and_unload_equals_the_adapted_model(config: OrthoftConfig) -> None:
    original = make_model()
    original.head.requires_grad_(False)
    model = get_orthoft_model(copy.deepcopy(original), config)
    randomize_adapters(model)
    x = tokens()
    adapted = model(x)
    merged = merge_and_unload(model)
    assert merged is model
    assert not any(isinstance(module, OrthoftLayer) for module in model.modules())
    assert type(model.layers[0].q) is nn.Linear
    torch.testing.assert_close(model(x), adapted, rtol=1e-10, atol=1e-12)
    # The parameters' own requires_grad flags come back.
    assert trainable_names(model) == trainable_names(original)
    with pytest.raises(ValueError, match="has no orthoft adapters"):
        active_adapters(model)


def test_unload_gives_back_the_original_modules() -> None:
    model = make_model()
    q = model.layers[0].q
    x = tokens()
    expected = model(x)
    get_orthoft_model(model, OFTConfig(target_modules=["q", "mlp.2"], oft_block_size=8))
    randomize_adapters(model)
    model.layers[1].q.merge()
    assert not torch.allclose(model(x), expected)
    assert unload(model) is model
    assert model.layers[0].q is q
    assert not any(isinstance(module, OrthoftLayer) for module in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_training_changes_only_trainable_parameters() -> None:
    model = get_orthoft_model(
        make_model(), OFTConfig(target_modules=["q", "v"], oft_block_size=4, bias="oft_only")
    )
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainable = trainable_names(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = tokens(), torch.randn(3, 7, 5, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    assert isinstance(model.layers[0].q, OFTLinear)


def test_adapted_layers_take_the_mode_of_the_modules_they_replace() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    model[1].train()
    get_orthoft_model(model, OFTConfig(target_modules=["0", "1"], oft_block_size=4))
    assert [layer.training for layer in model] == [False, True]
    model.train()
    assert all(module.training for module in model.modules())
