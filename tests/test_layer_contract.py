"""What every layer promises: options from one declaration, adapter ownership and the deletion policy,
base-layer kinds from the registry, drop-in attributes, and dropout only while training."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import orthoft
from orthoft import reference
from orthoft.config import BOFTConfig, OFTConfig
from orthoft.layers import BOFTConv2d, BOFTLinear, OFTConv2d, OFTLinear, kinds
from orthoft.layers.kinds import BaseLayerKind, kind_of, register_kind
from orthoft.layers.options import BOFTOptions, OFTOptions
from orthoft.tuner import active_adapters, delete_adapter, get_orthoft_model, set_adapter

METHODS = [
    (OFTOptions, OFTConfig, (OFTLinear, OFTConv2d)),
    (BOFTOptions, BOFTConfig, (BOFTLinear, BOFTConv2d)),
]


@pytest.mark.parametrize(("options_class", "config_class", "layer_classes"), METHODS)
def test_layers_configs_and_add_adapter_take_the_declared_options(options_class, config_class, layer_classes):
    declared = {field.name: field.default for field in dataclasses.fields(options_class)}
    for function in [cls.__init__ for cls in layer_classes] + [layer_classes[0].add_adapter]:
        keywords = {
            name: parameter.default
            for name, parameter in inspect.signature(function).parameters.items()
            if name in declared
        }
        assert keywords == declared, function.__qualname__
    config = config_class(target_modules=["q"])
    assert config.layer_options() == declared
    peft_fields = {field.name for field in dataclasses.fields(config_class)}
    assert {options_class.peft_field(name) for name in declared} <= peft_fields
    with pytest.raises(TypeError, match=r"OFTLinear|BOFTLinear"):
        layer_classes[0](16, 8, block_sizes=4)


def _four_layer_adapters() -> OFTLinear:
    layer = OFTLinear(16, 8, block_size=4, adapter_name="zeta")
    for name in ("alpha", "mid"):
        layer.add_adapter(name, block_size=8, init_weights=False)
    return layer


def test_deleting_the_active_adapter_activates_the_first_added_of_the_rest_in_a_layer() -> None:
    layer = _four_layer_adapters()
    layer.set_adapter("mid")
    with pytest.warns(UserWarning, match="'mid' was the active one; 'zeta' is active now"):
        layer.delete_adapter("mid")
    assert layer.active_adapters == ["zeta"]
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["oft_R.zeta.weight"]
    layer.set_adapter(["alpha", "zeta"])
    layer.delete_adapter("zeta")  # another active adapter remains: no change of the active set
    assert layer.active_adapters == ["alpha"]


def test_deleting_the_active_adapter_activates_the_first_added_of_the_rest_in_a_model() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    config = OFTConfig(target_modules=["0", "2"], oft_block_size=4)
    for name in ("zeta", "alpha", "mid"):
        get_orthoft_model(model, config, adapter_name=name)
    set_adapter(model, "mid")
    with pytest.warns(UserWarning, match="'mid' was the active one; 'zeta' is active now"):
        delete_adapter(model, "mid")
    assert active_adapters(model) == ["zeta"]
    assert all(layer.active_adapters == ["zeta"] for layer in (model[0], model[2]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.oft_R.zeta.weight", "2.oft_R.zeta.weight"}


class ScaledLinear(nn.Module):
    """A linear layer of a kind orthoft does not know, with its weight stored transposed and scaled."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.stored = nn.Parameter(torch.randn(in_features, out_features) * 2.0)
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.stored / 2.0) + self.bias


def test_a_new_base_layer_kind_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kinds, "_KINDS", list(kinds._KINDS))  # the entry is for this test only
    torch.manual_seed(3)
    model = nn.Sequential(ScaledLinear(16, 8))
    with pytest.raises(
        TypeError, match=r"supported are torch\.nn\.Linear, transformers' Conv1D, torch\.nn\.Conv2d"
    ):
        get_orthoft_model(model, OFTConfig(target_modules=["0"], oft_block_size=4))

    def write(module: nn.Module, weight: torch.Tensor) -> None:
        module.stored.copy_(weight.mT * 2.0)

    register_kind(
        BaseLayerKind(
            name="tests' ScaledLinear",
            family="linear",
            matches=lambda module: isinstance(module, ScaledLinear),
            features=lambda module: tuple(module.stored.shape),
            weight=lambda module: module.stored.mT / 2.0,
            write_weight=write,
            save_weight=lambda module: module.stored.detach().clone(),
            restore_weight=lambda module, saved: module.stored.copy_(saved),
        )
    )
    assert kind_of(model[0]).name == "tests' ScaledLinear"
    stored = model[0].stored.detach().clone()
    get_orthoft_model(model, BOFTConfig(target_modules=["0"], boft_block_size=4, init_weights=False))
    layer = model[0]
    x = torch.randn(5, 16)
    rotation = reference.butterfly_matrix(
        reference.cayley(0.5 * (layer.boft_R["default"] - layer.boft_R["default"].mT).detach()), 4
    )
    expected = (x @ rotation @ (stored / 2.0)) * layer.boft_s["default"].detach().T + model[0].bias
    # BOFT's output scale needs the kind to run without its bias, which this entry does not say how.
    with pytest.raises(TypeError, match="output scale needs a tests' ScaledLinear without its bias"):
        layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.stored, stored)


@pytest.mark.parametrize("cls", [OFTLinear, BOFTLinear])
def test_linear_layers_expose_the_base_layer_attributes(cls) -> None:
    layer = cls(32, 16, block_size=8)
    base = layer.get_base_layer()
    assert base is layer.base_layer and isinstance(base, nn.Linear)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (32, 16)
    nn.init.zeros_(layer.bias)
    nn.init.kaiming_uniform_(layer.weight)
    assert torch.count_nonzero(base.bias) == 0 and torch.count_nonzero(base.weight) > 0
    assert cls(32, 16, bias=False, block_size=8).bias is None


@pytest.mark.parametrize("cls", [OFTConv2d, BOFTConv2d])
def test_conv_layers_expose_the_base_layer_attributes(cls) -> None:
    layer = cls(
        8, 6, (3, 2), stride=2, padding=1, dilation=(2, 1), groups=2, padding_mode="reflect", block_size=4
    )
    base = layer.get_base_layer()
    for name in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "weight",
        "bias",
    ):
        assert getattr(layer, name) is getattr(base, name), name
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.groups) == (8, 6, (3, 2), 2)


def _reference_boft_output(
    layer: BOFTLinear, x: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """BOFTLinear's output from orthoft.reference, with the blocks where ``keep`` is False set to identity."""
    blocks = layer.boft_R["default"].detach().double()
    rotations = reference.cayley((0.5 * (blocks - blocks.mT)).flatten(0, 1)).reshape(blocks.shape)
    if keep is not None:
        rotations = torch.where(
            keep[..., None, None], rotations, torch.eye(blocks.shape[-1], dtype=torch.float64)
        )
    rotation = reference.butterfly_matrix(rotations, blocks.shape[-1])
    base = layer.base_layer
    out = (x.double() @ rotation @ base.weight.double().T) * layer.boft_s["default"].detach().double().T
    return out + base.bias.double()


def test_boft_dropout_drops_some_blocks_of_one_factor_in_training_only() -> None:
    torch.manual_seed(21)
    layer = BOFTLinear(32, 32, block_size=4, n_butterfly_factor=2, dropout=0.5, init_weights=False)
    x = torch.randn(7, 32)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _reference_boft_output(layer, x), rtol=1e-5, atol=1e-5)
    layer.train()
    trained = layer(x).double()
    # Exactly int(0.5 * 8) = 4 blocks of one of the 2 factors are the identity: find which.
    candidates = []
    for factor in range(2):
        for dropped in torch.combinations(torch.arange(8), 4):
            keep = torch.ones(2, 8, dtype=torch.bool)
            keep[factor, dropped] = False
            if torch.allclose(trained, _reference_boft_output(layer, x, keep), rtol=1e-5, atol=1e-5):
                candidates.append((factor, dropped.tolist()))
    assert len(candidates) == 1, candidates


def test_oft_dropout_drops_some_blocks_in_training_only() -> None:
    torch.manual_seed(22)
    layer = OFTLinear(24, 24, block_size=4, dropout=0.5, init_weights=False)
    x = torch.eye(24)
    packed = layer.oft_R["default"].weight.detach().double()
    rows, cols = torch.triu_indices(4, 4, 1)
    upper = torch.zeros(6, 4, 4, dtype=torch.float64)
    upper[:, rows, cols] = packed
    blocks = reference.cayley(upper - upper.mT, 5)
    weight, bias = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    layer.eval()
    expected = reference.block_diag(blocks) @ weight.T + bias
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    # x is the identity: the output reveals R' = (y - bias) @ inv(W^T).
    rotation = (layer(x).double() - bias) @ torch.linalg.inv(weight.T)
    found = rotation.reshape(6, 4, 6, 4).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    is_identity = torch.isclose(found, torch.eye(4, dtype=torch.float64), atol=1e-4).all(dim=(-2, -1))
    assert int(is_identity.sum()) == 3
    torch.testing.assert_close(found[~is_identity], blocks[~is_identity], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rotation, torch.block_diag(*found), rtol=0, atol=1e-4)


def test_the_package_exposes_the_layer_contract() -> None:
    assert orthoft.OFTLinear is OFTLinear and orthoft.BOFTConv2d is BOFTConv2d
