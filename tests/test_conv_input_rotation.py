"""1x1 convolutions that rotate their input channels instead of their weight: the same function."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from orthoft.layers import BOFTConv2d, OFTConv2d, OrthoftLayer
from test_layers_conv import randomize, reference_rotation

from helpers import saved_bytes

# 1x1 convolutions with more output channels than 4 * chunk * groups, so that the input is rotated.
ONE_BY_ONE = [
    {},
    {"stride": 2, "padding": 1},
    {"stride": (2, 1), "padding": (1, 2), "dilation": 3, "bias": False},
    {"groups": 2, "padding": 2, "padding_mode": "reflect"},
    {"padding": 1, "padding_mode": "replicate", "stride": 2},
    {"padding": (2, 1), "padding_mode": "circular", "groups": 2},
    {"padding": "same", "padding_mode": "reflect"},
    {"padding": "valid", "dilation": 2},
]


def one_by_one_layers(conv_args: dict[str, object], **kwargs: object) -> list[OrthoftLayer]:
    args = {"in_channels": 8, "out_channels": 72, "kernel_size": 1, **conv_args}
    return [
        OFTConv2d(**args, block_size=4, **kwargs),
        OFTConv2d(**args, block_size=4, use_cayley_neumann=False, block_share=True, **kwargs),
        BOFTConv2d(**args, block_size=2, **kwargs),
        BOFTConv2d(**args, block_size=2, n_butterfly_factor=2, **kwargs),
    ]


def weight_path(layer: OrthoftLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output through the rotated weight, whatever path its forward takes."""
    matrix = layer._adapted_weight_matrix(layer.weight, layer.active_adapters, layer.training)
    return layer.base_layer._conv_forward(x, layer._weight_from_matrix(matrix), layer.base_layer.bias)


def trainable(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in layer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("conv_args", ONE_BY_ONE)
def test_rotated_input_equals_weight_path_and_merged_conv(conv_args: dict[str, object]) -> None:
    torch.manual_seed(1)
    for layer in one_by_one_layers(conv_args, dtype=torch.float64):
        randomize(layer)
        assert layer._rotates_input(["default"])
        x = torch.randn(2, 8, 9, 7, dtype=torch.float64, requires_grad=True)
        out = layer(x)
        grad = torch.randn_like(out)
        tensors = trainable(layer)
        grads = torch.autograd.grad(out, [x, *tensors.values()], grad)

        through_weight = weight_path(layer, x)
        torch.testing.assert_close(out, through_weight)
        torch.testing.assert_close(grads, torch.autograd.grad(through_weight, [x, *tensors.values()], grad))

        copies = {name: p.detach().clone().requires_grad_(True) for name, p in tensors.items()}
        blocks = copies["oft_R.default.weight" if isinstance(layer, OFTConv2d) else "boft_R.default"]
        merged = layer.weight.reshape(layer.out_channels, -1) @ reference_rotation(layer, blocks).mT
        if "boft_s.default" in copies:
            merged = merged * copies["boft_s.default"].reshape(-1, 1)
        hand_built = copy.deepcopy(layer.base_layer)
        del hand_built.weight
        hand_built.weight = merged.reshape(layer.weight.shape)
        x_ref = x.detach().clone().requires_grad_(True)
        expected = hand_built(x_ref)
        torch.testing.assert_close(out, expected)
        expected.backward(grad)
        torch.testing.assert_close(grads[0], x_ref.grad)
        torch.testing.assert_close(list(grads[1:]), [copies[name].grad for name in tensors])
        assert layer.weight.grad is None


@pytest.mark.parametrize("conv_args", ONE_BY_ONE[:4])
def test_rotated_input_is_exact_at_init_and_merges(conv_args: dict[str, object]) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 8, 6, 5)
    for layer in one_by_one_layers(conv_args):
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
        randomize(layer)
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()


def test_channels_last_and_input_without_gradient() -> None:
    torch.manual_seed(3)
    for layer in one_by_one_layers({"stride": 2, "padding": 1}, dtype=torch.float64):
        randomize(layer)
        x = torch.randn(2, 8, 6, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
        out = layer(x)
        torch.testing.assert_close(out, weight_path(layer, x))
        tensors = list(trainable(layer).values())
        torch.testing.assert_close(
            torch.autograd.grad(out.square().sum(), tensors),
            torch.autograd.grad(weight_path(layer, x).square().sum(), tensors),
        )


def test_unbatched_input() -> None:
    torch.manual_seed(7)
    for layer in one_by_one_layers({"padding": 1, "padding_mode": "reflect"}, dtype=torch.float64):
        randomize(layer)
        x = torch.randn(8, 5, 4, dtype=torch.float64)
        torch.testing.assert_close(layer(x), weight_path(layer, x))


def test_trainable_bias_gets_its_gradient() -> None:
    torch.manual_seed(4)
    for layer in one_by_one_layers({"padding": 1}, dtype=torch.float64):
        randomize(layer)
        layer.base_layer.bias.requires_grad_(True)
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
        ours = torch.autograd.grad(layer(x).square().sum(), layer.base_layer.bias)
        torch.testing.assert_close(
            ours, torch.autograd.grad(weight_path(layer, x).square().sum(), layer.base_layer.bias)
        )


def test_trainable_weight_or_small_output_rotates_the_weight() -> None:
    torch.manual_seed(5)
    layer = BOFTConv2d(8, 72, 1, block_size=2, dtype=torch.float64)
    assert layer._rotates_input(["default"])
    layer.base_layer.weight.requires_grad_(True)
    assert not layer._rotates_input(["default"])
    randomize(layer)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    layer(x).square().sum().backward()
    expected = torch.autograd.grad(weight_path(layer, x).square().sum(), layer.base_layer.weight)
    torch.testing.assert_close(layer.base_layer.weight.grad, expected[0])
    # Below out = 4 * C the two chunk products over the inputs cost more than the weight gradient.
    assert OFTConv2d(8, 32, 1, block_size=8)._rotates_input(["default"])
    assert not OFTConv2d(8, 24, 1, block_size=8)._rotates_input(["default"])
    assert not OFTConv2d(8, 72, 3, block_size=8)._rotates_input(["default"])


def test_rotated_input_is_not_kept_for_backward() -> None:
    x = torch.randn(4, 64, 16, 16, requires_grad=True)
    for layer in (OFTConv2d(64, 512, 1, block_size=8), BOFTConv2d(64, 512, 1, block_size=8)):
        assert layer._rotates_input(["default"])
        # The input (which the caller holds), the weight and small adapter tensors; no rotated input.
        assert saved_bytes(layer, x) < x.numel() * 4 + layer.weight.numel() * 4 + 2**16


@pytest.mark.parametrize("cls", [OFTConv2d, BOFTConv2d])
def test_rotated_input_compiles_without_graph_breaks(cls: type[OrthoftLayer]) -> None:
    torch.manual_seed(6)
    layer = cls(
        8, 72, 1, padding=1, padding_mode="reflect", block_size=2, init_weights=False, dtype=torch.float64
    )
    assert layer._rotates_input(["default"])
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in (x, *trainable(layer).values())]
    layer.zero_grad()
    x.grad = None
    layer(x).square().sum().backward()
    torch.testing.assert_close(grads, [p.grad for p in (x, *trainable(layer).values())])
