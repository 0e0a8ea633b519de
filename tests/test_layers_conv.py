"""OFTConv2d and BOFTConv2d: exact at init and equal to a hand-built merged nn.Conv2d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from orthoft import reference
from orthoft.layers import BOFTConv2d, OFTConv2d, OrthoftLayer

from helpers import train_adapters

# (conv arguments, OFT block size, BOFT block size and factor count), covering kernel shapes,
# groups, stride, dilation and every padding mode.
CONV_CASES = [
    ({"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1}, 6, (6, 2)),
    ({"in_channels": 4, "out_channels": 6, "kernel_size": (1, 3), "stride": 2}, 4, (2, 2)),
    ({"in_channels": 8, "out_channels": 4, "kernel_size": (3, 2), "groups": 2, "dilation": 2}, 6, (2, 3)),
    (
        {
            "in_channels": 4,
            "out_channels": 8,
            "kernel_size": 3,
            "groups": 4,
            "padding": 2,
            "padding_mode": "reflect",
        },
        3,
        (3, 1),
    ),
    (
        {
            "in_channels": 3,
            "out_channels": 5,
            "kernel_size": (2, 4),
            "padding": (1, 2),
            "padding_mode": "circular",
        },
        8,
        (4, 2),
    ),
    (
        {
            "in_channels": 2,
            "out_channels": 4,
            "kernel_size": 2,
            "padding": "same",
            "padding_mode": "replicate",
        },
        4,
        (2, 2),
    ),
    ({"in_channels": 8, "out_channels": 8, "kernel_size": 1, "bias": False}, 4, (2, 3)),
]


def make_layers(
    conv_args: dict[str, object], oft_block: int, boft: tuple[int, int], **kwargs: object
) -> list[OrthoftLayer]:
    block_size, factors = boft
    return [
        OFTConv2d(**conv_args, block_size=oft_block, **kwargs),
        OFTConv2d(**conv_args, block_size=oft_block, use_cayley_neumann=False, block_share=True, **kwargs),
        BOFTConv2d(**conv_args, block_size=block_size, n_butterfly_factor=factors, **kwargs),
    ]


def reference_rotation(layer: OrthoftLayer, blocks: torch.Tensor) -> torch.Tensor:
    """Dense R of the default adapter from its tensor, with orthoft.reference only."""
    options = layer.adapter_options["default"]
    b = options.block_size
    if isinstance(layer, OFTConv2d):
        rows, cols = torch.triu_indices(b, b, 1)
        upper = torch.zeros(blocks.shape[0], b, b, dtype=blocks.dtype)
        upper[:, rows, cols] = blocks
        terms = options.num_cayley_neumann_terms if options.use_cayley_neumann else 0
        return reference.block_diag(reference.cayley(upper - upper.mT, terms).expand(options.r, b, b))
    m, d = blocks.shape[:2]
    skew = (0.5 * (blocks - blocks.mT)).reshape(m * d, b, b)
    return reference.butterfly_matrix(reference.cayley(skew).reshape(blocks.shape), b)


def randomize(layer: OrthoftLayer) -> None:
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(1.0 if name.startswith("boft_s") else 0.0, 0.3)


@pytest.mark.parametrize(("conv_args", "oft_block", "boft"), CONV_CASES)
def test_identity_at_init_equals_base_conv(
    conv_args: dict[str, object], oft_block: int, boft: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, conv_args["in_channels"], 9, 8)
    for layer in make_layers(conv_args, oft_block, boft):
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


@pytest.mark.parametrize(("conv_args", "oft_block", "boft"), CONV_CASES)
def test_matches_hand_built_merged_conv(
    conv_args: dict[str, object], oft_block: int, boft: tuple[int, int]
) -> None:
    torch.manual_seed(1)
    for layer in make_layers(conv_args, oft_block, boft, dtype=torch.float64):
        randomize(layer)
        base = layer.base_layer
        x = torch.randn(2, base.in_channels, 9, 8, dtype=torch.float64, requires_grad=True)
        out = layer(x)

        tensors = {name: p for name, p in layer.named_parameters() if p.requires_grad}
        copies = {name: p.detach().clone().requires_grad_(True) for name, p in tensors.items()}
        blocks = copies["oft_R.default.weight" if isinstance(layer, OFTConv2d) else "boft_R.default"]
        rotation = reference_rotation(layer, blocks)
        out_channels = base.out_channels
        merged = base.weight.reshape(out_channels, -1) @ rotation.mT
        if "boft_s.default" in copies:
            merged = merged * copies["boft_s.default"].reshape(out_channels, 1)
        hand_built = copy.deepcopy(base)
        del hand_built.weight
        hand_built.weight = merged.reshape(base.weight.shape)  # a plain tensor, to follow its gradient
        x_ref = x.detach().clone().requires_grad_(True)
        expected = hand_built(x_ref)
        torch.testing.assert_close(out, expected)

        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad)
        for name, parameter in tensors.items():
            torch.testing.assert_close(parameter.grad, copies[name].grad)
        assert base.weight.grad is None


@pytest.mark.parametrize(("conv_args", "oft_block", "boft"), CONV_CASES[:4])
def test_merged_equals_unmerged_and_unmerge_restores(
    conv_args: dict[str, object], oft_block: int, boft: tuple[int, int]
) -> None:
    torch.manual_seed(2)
    for layer in make_layers(conv_args, oft_block, boft):
        randomize(layer)
        x = torch.randn(2, conv_args["in_channels"], 9, 8)
        unmerged = layer(x)
        original = layer.base_layer.weight.detach().clone()
        delta = layer.get_delta_weight()
        assert delta.shape == original.shape
        layer.merge(safe_merge=True)
        torch.testing.assert_close(layer.base_layer.weight, original + delta)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, original)


def test_filter_size_and_adapter_shapes() -> None:
    layer = BOFTConv2d(6, 12, (3, 2), groups=3, block_size=2, n_butterfly_factor=2)
    assert layer.filter_size == (6 // 3) * 3 * 2 == 12
    assert layer.in_channels == layer.in_features == 6 and layer.out_channels == layer.out_features == 12
    assert tuple(layer.boft_R["default"].shape) == (2, 6, 2, 2)
    assert tuple(layer.boft_s["default"].shape) == (1, 12)
    assert tuple(layer.get_rotation().shape) == (12, 12)
    oft = OFTConv2d(6, 12, (3, 2), groups=3, r=2, block_size=0)
    assert tuple(oft.oft_R["default"].weight.shape) == (2, 15)
    assert "kernel_size=(3, 2), filter_size=12" in oft.extra_repr()


def test_from_module_shares_parameters() -> None:
    conv = nn.Conv2d(4, 6, 3)
    layer = BOFTConv2d.from_module(conv, adapter_name="style", block_size=4, layer_name="unet.down.0")
    assert layer.base_layer is conv and layer.base_layer.weight is conv.weight
    assert not conv.weight.requires_grad and not conv.bias.requires_grad
    assert list(layer.boft_R) == ["style"]


def test_half_precision_conv() -> None:
    torch.manual_seed(3)
    layer = OFTConv2d(4, 6, 3, padding=1, block_size=6, init_weights=False)
    x = torch.randn(2, 4, 7, 7)
    expected = layer(x)
    layer.base_layer.to(torch.bfloat16)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=6e-2)
    out.float().sum().backward()
    assert layer.oft_R["default"].weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: OFTConv2d(3, 8, 3, block_size=4, layer_name="stem"),
            r"OFTConv2d 'stem': block_size=4 is invalid: it must divide the filter size "
            r"\(in_channels/groups\)\*kh\*kw = \(3/1\)\*3\*3 = 27.* 3, 9, 27$",
        ),
        (
            lambda: BOFTConv2d(4, 8, (3, 2), groups=2, block_size=4, n_butterfly_factor=2),
            r"BOFTConv2d: n_butterfly_factor=2 is invalid: .*\(4/2\)\*3\*2 = 12 .*block size 4 does not "
            r"satisfy \(block_size values that do: 2, 6\); valid n_butterfly_factor values near 2: 1$",
        ),
        (
            lambda: OFTConv2d.from_module(nn.Conv2d(4, 4, 3), fan_in_fan_out=True, block_size=4),
            r"OFTConv2d: fan_in_fan_out=True applies to Conv1D layers only",
        ),
    ],
)
def test_invalid_options_name_the_filter_size(make: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("module", [nn.Conv1d(4, 4, 3), nn.Conv3d(2, 2, 1), nn.Linear(4, 4)])
def test_unsupported_base_layer_is_a_type_error(module: nn.Module) -> None:
    for cls in (OFTConv2d, BOFTConv2d):
        with pytest.raises(
            TypeError, match=rf"{cls.__name__} cannot wrap .*supported base layers: torch.nn.Conv2d"
        ):
            cls.from_module(module, block_size=2)


def test_training_changes_only_adapter_parameters_and_reduces_loss() -> None:
    torch.manual_seed(4)
    layer = BOFTConv2d(4, 6, 3, padding=1, block_size=6, n_butterfly_factor=2)
    x = torch.randn(8, 4, 6, 6)
    target = torch.randn_like(layer(x))
    losses = train_adapters(layer, x, target, steps=10)
    assert losses[-1] < losses[0]
