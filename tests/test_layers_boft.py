"""BOFTLinear against a hand-built merged nn.Linear built from orthoft.reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orthoft import reference
from orthoft.layers import BOFTLinear
from orthoft.layers.rotation import rotate_rows_transposed

from helpers import train_adapters


def reference_rotation(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dense R of BOFT ``boft_R`` blocks ``(m, D, b, b)``: exact Cayley, dense permutation matrices."""
    m, d, b, _ = blocks.shape
    rotations = reference.cayley((0.5 * (blocks - blocks.mT)).reshape(m * d, b, b)).reshape(m, d, b, b)
    return reference.butterfly_matrix(rotations, block_size)


def randomize(layer: BOFTLinear) -> None:
    with torch.no_grad():
        for blocks in layer.boft_R.values():
            blocks.normal_(0.0, 0.3)
        for scale in layer.boft_s.values():
            scale.normal_(1.0, 0.2)


def test_identity_at_init() -> None:
    torch.manual_seed(0)
    layer = BOFTLinear(64, 24, block_size=4, n_butterfly_factor=3)
    assert tuple(layer.boft_R["default"].shape) == (3, 16, 4, 4)
    assert tuple(layer.boft_s["default"].shape) == (24, 1)
    assert torch.count_nonzero(layer.boft_R["default"]) == 0
    assert torch.equal(layer.boft_s["default"], torch.ones(24, 1))
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_random_init_follows_peft() -> None:
    torch.manual_seed(1)
    layer = BOFTLinear(256, 256, block_size=8, init_weights=False)
    blocks, scale = layer.boft_R["default"], layer.boft_s["default"]
    assert abs(blocks.std().item() - 0.1) < 0.01 and abs(blocks.mean().item()) < 0.01
    assert abs(scale.std().item() - 0.1) < 0.03 and abs(scale.mean().item() - 1.0) < 0.03


@pytest.mark.parametrize(
    ("options", "blocks_shape"),
    [
        ({"block_size": 8}, (1, 8, 8, 8)),
        ({"block_size": 4, "n_butterfly_factor": 2}, (2, 16, 4, 4)),
        ({"block_size": 2, "n_butterfly_factor": 4}, (4, 32, 2, 2)),
        ({"block_size": 4, "n_butterfly_factor": 5}, (5, 16, 4, 4)),
        ({"block_size": 0, "block_num": 8, "n_butterfly_factor": 3}, (3, 8, 8, 8)),
        ({"block_size": 0, "block_num": 2, "n_butterfly_factor": 2}, (2, 2, 32, 32)),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_hand_built_linear(
    options: dict[str, int], blocks_shape: tuple[int, ...], bias: bool
) -> None:
    torch.manual_seed(2)
    layer = BOFTLinear(64, 24, bias=bias, dtype=torch.float64, **options)
    assert tuple(layer.boft_R["default"].shape) == blocks_shape
    randomize(layer)
    blocks, scale = layer.boft_R["default"], layer.boft_s["default"]
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    out = layer(x)

    blocks_ref = blocks.detach().clone().requires_grad_(True)
    scale_ref = scale.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    rotation = reference_rotation(blocks_ref, layer.adapter_options["default"].block_size)
    base = layer.base_layer
    merged_weight = (base.weight @ rotation.mT) * scale_ref
    expected = x_ref @ merged_weight.mT + (base.bias if bias else 0.0)
    torch.testing.assert_close(out, expected)

    hand_built = nn.Linear(64, 24, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        hand_built.weight.copy_(merged_weight)
        if bias:
            hand_built.bias.copy_(base.bias)
    torch.testing.assert_close(out, hand_built(x))

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(blocks.grad, blocks_ref.grad)
    torch.testing.assert_close(scale.grad, scale_ref.grad)
    assert base.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_layer(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    layer = BOFTLinear(64, 24, block_size=4, n_butterfly_factor=2)
    randomize(layer)
    x = torch.randn(5, 64)
    expected = layer(x)
    layer.base_layer.to(dtype)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=5e-2)
    out.float().sum().backward()
    assert layer.boft_R["default"].grad.dtype == torch.float32
    assert torch.isfinite(layer.boft_R["default"].grad).all()
    assert torch.isfinite(layer.boft_s["default"].grad).all()


def test_merge_unmerge_includes_the_scale() -> None:
    torch.manual_seed(4)
    layer = BOFTLinear(32, 12, block_size=4, n_butterfly_factor=3)
    randomize(layer)
    x = torch.randn(6, 32)
    unmerged = layer(x)
    original = layer.base_layer.weight.detach().clone()
    rotation = reference_rotation(layer.boft_R["default"].detach(), 4)
    merged_weight = (original @ rotation.mT) * layer.boft_s["default"].detach()
    torch.testing.assert_close(layer.get_rotation(), rotation)
    torch.testing.assert_close(layer.get_delta_weight(), merged_weight - original)
    layer.merge(safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, merged_weight)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_multiple_adapters_multiply_scales() -> None:
    torch.manual_seed(5)
    layer = BOFTLinear(32, 12, block_size=4, n_butterfly_factor=2)
    layer.add_adapter("second", block_size=8, n_butterfly_factor=3)
    randomize(layer)
    layer.set_adapter(["default", "second"])
    x = torch.randn(6, 32)
    rotation = layer.get_rotation("second") @ layer.get_rotation("default")
    scale = layer.boft_s["default"] * layer.boft_s["second"]
    base = layer.base_layer
    expected = (x @ rotation @ base.weight.T) * scale.T + base.bias
    torch.testing.assert_close(layer(x), expected)
    layer.merge(adapter_names=["default", "second"])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight(), base.weight - layer._unmerged_weight)


def test_dropout_replaces_blocks_only_while_training() -> None:
    torch.manual_seed(6)
    layer = BOFTLinear(16, 8, block_size=4, dropout=1.0)
    randomize(layer)
    x = torch.randn(3, 16)
    base = layer.base_layer
    # With one factor and p = 1 every block becomes the identity; the scale stays.
    scaled = (x @ base.weight.T) * layer.boft_s["default"].T + base.bias
    torch.testing.assert_close(layer(x), scaled)
    layer.eval()
    expected = (x @ layer.get_rotation() @ base.weight.T) * layer.boft_s["default"].T + base.bias
    torch.testing.assert_close(layer(x), expected)


def test_wraps_transformers_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(7)
    conv1d = Conv1D(12, 32)
    layer = BOFTLinear.from_module(conv1d, block_size=4, n_butterfly_factor=2)
    randomize(layer)
    assert layer.fan_in_fan_out
    x = torch.randn(2, 5, 32)
    expected = (x @ layer.get_rotation() @ conv1d.weight) * layer.boft_s["default"].T + conv1d.bias
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"block_size": 5}, r"BOFTLinear 'mlp.up': block_size=5 is invalid.*in_features=48.* 2, 3, 4, 6$"),
        (
            {"block_size": 3, "n_butterfly_factor": 2},
            r"n_butterfly_factor=2 is invalid.*block size 3 does not satisfy "
            r"\(block_size values that do: 2, 4, 6, 8\).*n_butterfly_factor values near 2: 1$",
        ),
        (
            {"block_size": 4, "n_butterfly_factor": 4},
            r"b \* 8.*block size 4.* n_butterfly_factor values near 4: 1, 2, 3$",
        ),
        (
            {"block_size": 7, "n_butterfly_factor": 2},
            r"block_size=7 is invalid: with n_butterfly_factor=2.* 2, 4, 6, 8$",
        ),
        ({"block_size": 0, "block_num": 7}, r"block_num=7 is invalid.* 3, 4, 6, 8$"),
        (
            {"block_size": 0, "block_num": 3, "n_butterfly_factor": 2},
            r"n_butterfly_factor=2 is invalid.*block size 16 does not satisfy "
            r"\(block_num values that do: 2, 4, 6, 8\)",
        ),
        ({"block_size": 0}, r"exactly one of block_size and block_num.*block_size=0, block_num=0"),
        ({"block_num": 8}, r"exactly one of block_size and block_num.*block_size=4, block_num=8"),
        ({"n_butterfly_factor": 0}, r"n_butterfly_factor must be an integer >= 1, got 0"),
        ({"n_butterfly_factor": 31}, r"n_butterfly_factor must be at most 30, got 31"),
        ({"dropout": -0.1}, r"dropout must be a probability in \[0, 1\], got -0.1"),
    ],
)
def test_invalid_options_name_layer_argument_value_and_valid_values(
    options: dict[str, int], pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        BOFTLinear.from_module(nn.Linear(48, 8), layer_name="mlp.up", **options)


def test_unsupported_base_layer_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"BOFTLinear cannot wrap a torch.nn.modules.conv.Conv1d"):
        BOFTLinear.from_module(nn.Conv1d(4, 4, 3))


def test_extra_repr_shows_dimensions_options_and_active_adapters() -> None:
    layer = BOFTLinear(64, 32, block_size=0, block_num=8, n_butterfly_factor=2, dropout=0.1)
    text = layer.extra_repr()
    assert "in_features=64, out_features=32" in text
    assert "active_adapters=['default']" in text
    assert "default: block_size=8, block_num=8, n_butterfly_factor=2, dropout=0.1" in text


def test_training_changes_only_adapter_parameters_and_reduces_loss() -> None:
    torch.manual_seed(8)
    layer = BOFTLinear(16, 8, block_size=4, n_butterfly_factor=2)
    x = torch.randn(64, 16)
    target = 1.3 * layer(x).detach() @ torch.linalg.qr(torch.randn(8, 8))[0]
    losses = train_adapters(layer, x, target, steps=15)
    assert losses[-1] < 0.9 * losses[0]
    assert not torch.equal(layer.boft_s["default"], torch.ones(8, 1))


@pytest.mark.parametrize(("b", "m", "n"), [(4, 1, 16), (4, 3, 32), (2, 5, 64), (8, 2, 48)])
def test_rotate_rows_transposed_matches_dense(b: int, m: int, n: int) -> None:
    rotations = torch.randn(m, n // b, b, b, dtype=torch.float64)
    matrix = torch.randn(7, n, dtype=torch.float64)
    want = matrix @ reference.butterfly_matrix(rotations, b).T
    torch.testing.assert_close(rotate_rows_transposed(matrix, rotations, b), want)
