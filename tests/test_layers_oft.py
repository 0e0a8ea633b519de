"""OFTLinear against a hand-built merged nn.Linear, and the behaviour every layer shares."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from orthoft import reference
from orthoft.layers import OFTLinear, OrthoftLayer
from orthoft.layers.rotation import drop_blocks, project_packed_skew

from helpers import train_adapters


def reference_rotation(layer: OFTLinear, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
    """Dense R of an OFT adapter from its packed weight, with orthoft.reference only."""
    options = layer.adapter_options[adapter_name]
    b = options.block_size
    rows, cols = torch.triu_indices(b, b, 1)
    upper = torch.zeros(weight.shape[0], b, b, dtype=weight.dtype)
    upper[:, rows, cols] = weight
    terms = options.num_cayley_neumann_terms if options.use_cayley_neumann else 0
    blocks = reference.cayley(upper - upper.mT, terms)
    return reference.block_diag(blocks.expand(options.r, b, b))


def hand_built_linear(layer: OFTLinear, rotation: torch.Tensor) -> nn.Linear:
    base = layer.base_layer
    merged = nn.Linear(base.in_features, base.out_features, base.bias is not None, dtype=base.weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(base.weight @ rotation.mT)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    return merged


def randomize(layer: OrthoftLayer, std: float = 0.3) -> None:
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.requires_grad:
                parameter.normal_(0.0, std)


def test_identity_at_init_and_frozen_base() -> None:
    torch.manual_seed(0)
    layer = OFTLinear(48, 20, block_size=8)
    assert torch.count_nonzero(layer.oft_R["default"].weight) == 0
    x = torch.randn(3, 5, 48, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, layer.base_layer(x), rtol=0, atol=0)
    out.square().sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    assert layer.oft_R["default"].weight.grad is not None


@pytest.mark.parametrize(
    ("options", "shape"),
    [
        ({"block_size": 8}, (6, 28)),
        ({"r": 8, "block_size": 0}, (8, 15)),
        ({"block_size": 16, "block_share": True}, (1, 120)),
        ({"block_size": 48}, (1, 1128)),
    ],
)
def test_adapter_tensor_layout(options: dict[str, object], shape: tuple[int, int]) -> None:
    layer = OFTLinear(48, 20, dtype=torch.bfloat16, **options)
    weight = layer.oft_R["default"].weight
    assert tuple(weight.shape) == shape
    assert weight.dtype == torch.float32
    assert [name for name, _ in layer.named_parameters() if "oft_R" in name] == ["oft_R.default.weight"]
    assert layer.adapter_options["default"].r * layer.adapter_options["default"].block_size == 48


@pytest.mark.parametrize(
    "options",
    [
        {"block_size": 8, "use_cayley_neumann": False},
        {"block_size": 8, "num_cayley_neumann_terms": 2},
        {"block_size": 8, "num_cayley_neumann_terms": 3},
        {"block_size": 6, "num_cayley_neumann_terms": 5},
        {"block_size": 12, "num_cayley_neumann_terms": 8},
        {"block_size": 8, "block_share": True, "use_cayley_neumann": False},
        {"r": 3, "block_size": 0, "block_share": True},
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_hand_built_linear(options: dict[str, object], bias: bool) -> None:
    torch.manual_seed(1)
    layer = OFTLinear(48, 20, bias=bias, dtype=torch.float64, init_weights=False, **options)
    randomize(layer)
    weight = layer.oft_R["default"].weight
    x = torch.randn(2, 7, 48, dtype=torch.float64, requires_grad=True)
    out = layer(x)

    reference_weight = weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    rotation = reference_rotation(layer, "default", reference_weight)
    base = layer.base_layer
    expected = x_ref @ (base.weight @ rotation.mT).mT + (base.bias if bias else 0.0)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, hand_built_linear(layer, rotation.detach())(x))

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, reference_weight.grad)


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor that an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(item, torch.Tensor):
                self.shapes.append(tuple(item.shape))
        return out


def test_training_path_forms_no_dense_rotation() -> None:
    torch.manual_seed(2)
    layer = OFTLinear(96, 40, block_size=16, init_weights=False)
    x = torch.randn(3, 7, 96, requires_grad=True)
    with _ShapeRecorder() as recorder:
        layer(x).square().sum().backward()
    assert recorder.shapes
    assert not [shape for shape in recorder.shapes if shape[-2:] == (96, 96)]
    assert layer.base_layer.weight.grad is None
    # The same recorder sees the dense rotation where one is built.
    with _ShapeRecorder() as recorder:
        layer.get_rotation()
    assert (96, 96) in recorder.shapes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_layer(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    layer = OFTLinear(64, 24, block_size=16, init_weights=False)
    randomize(layer, std=0.1)
    x = torch.randn(5, 64)
    expected = layer(x)
    layer.base_layer.to(dtype)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)
    out.float().sum().backward()
    assert layer.oft_R["default"].weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.oft_R["default"].weight.grad).all()


def test_merge_unmerge_and_delta_weight() -> None:
    torch.manual_seed(4)
    layer = OFTLinear(32, 12, block_size=8, init_weights=False)
    randomize(layer)
    x = torch.randn(6, 32)
    unmerged = layer(x)
    original = layer.base_layer.weight.detach().clone()
    rotation = reference_rotation(layer, "default", layer.oft_R["default"].weight.detach())
    merged_weight = original @ rotation.mT

    torch.testing.assert_close(layer.get_delta_weight(), merged_weight - original)
    torch.testing.assert_close(layer.get_rotation(), rotation)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer.base_layer.weight, merged_weight)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    torch.testing.assert_close(layer.get_delta_weight(), merged_weight - original)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, original)
    with pytest.warns(UserWarning, match="nothing to unmerge"):
        layer.unmerge()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_in_half_precision_restores_exactly(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    layer = OFTLinear(32, 12, block_size=8, dtype=dtype, init_weights=False)
    original = layer.base_layer.weight.detach().clone()
    expected = (original.float() @ layer.get_rotation().mT).to(dtype)
    for _ in range(3):
        layer.merge()
        assert layer.base_layer.weight.dtype == dtype
        torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=0)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, original)


def test_safe_merge_rejects_non_finite_weights() -> None:
    layer = OFTLinear(32, 12, block_size=8, layer_name="encoder.proj")
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.oft_R["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"OFTLinear 'encoder.proj'.*'default'.*non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, original)


def test_multiple_adapters_compose_last_on_the_left() -> None:
    torch.manual_seed(6)
    layer = OFTLinear(24, 10, block_size=6, init_weights=False)
    layer.add_adapter("second", block_size=12, use_cayley_neumann=False, init_weights=False)
    assert layer.active_adapters == ["default"]
    assert not layer.oft_R["second"].weight.requires_grad
    x = torch.randn(4, 24)
    first = layer.get_rotation("default")
    second = layer.get_rotation("second")
    torch.testing.assert_close(layer(x), x @ first @ layer.base_layer.weight.T + layer.base_layer.bias)

    layer.set_adapter(["default", "second"])
    assert layer.oft_R["second"].weight.requires_grad
    composed = second @ first
    torch.testing.assert_close(layer.get_rotation(), composed)
    expected = x @ composed @ layer.base_layer.weight.T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    assert layer.merged_adapters == ["default", "second"]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()

    layer.set_adapter("second")
    assert not layer.oft_R["default"].weight.requires_grad
    torch.testing.assert_close(layer(x), x @ second @ layer.base_layer.weight.T + layer.base_layer.bias)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("second", block_size=6)


def test_delete_and_disable_adapters() -> None:
    torch.manual_seed(7)
    layer = OFTLinear(16, 8, block_size=4, init_weights=False)
    layer.add_adapter("other", block_size=8, init_weights=False)
    x = torch.randn(3, 16)
    base_out = layer.base_layer(x)

    layer.enable_adapters(False)
    assert layer.disable_adapters
    assert not any(p.requires_grad for p in layer.parameters())
    torch.testing.assert_close(layer(x), base_out, rtol=0, atol=0)
    layer.enable_adapters(True)
    assert layer.oft_R["default"].weight.requires_grad
    assert not torch.allclose(layer(x), base_out)

    # A merged layer whose adapters are then disabled runs the restored base weight.
    layer.merge()
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), base_out, rtol=0, atol=0)
    assert not layer.merged
    layer.enable_adapters(True)

    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.delete_adapter("default")
    layer.unmerge()
    with pytest.warns(UserWarning, match="'other' is active now"):
        layer.delete_adapter("default")
    assert layer.active_adapters == ["other"] and layer.adapter_names == ["other"]
    assert "default" not in layer.oft_R
    with pytest.raises(ValueError, match="no adapter named 'default'"):
        layer.delete_adapter("default")


def test_adapters_this_layer_lacks_are_skipped() -> None:
    layer = OFTLinear(16, 8, block_size=4, init_weights=False)
    x = torch.randn(3, 16)
    expected = layer(x)
    layer.set_adapter(["default", "elsewhere"])
    torch.testing.assert_close(layer(x), expected)
    layer.set_adapter("elsewhere")
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_drop_blocks_replaces_blocks_of_one_factor() -> None:
    torch.manual_seed(8)
    rotations = torch.randn(3, 8, 4, 4)
    dropped = drop_blocks(rotations, 0.3)
    is_identity = (dropped == torch.eye(4)).all(dim=(-2, -1))
    assert is_identity.sum() == int(0.3 * 8)
    assert is_identity.any(dim=1).sum() == 1
    torch.testing.assert_close(dropped[~is_identity], rotations[~is_identity], rtol=0, atol=0)
    assert drop_blocks(rotations, 0.1) is rotations  # int(0.1 * 8) == 0 blocks


def test_dropout_only_while_training() -> None:
    torch.manual_seed(9)
    layer = OFTLinear(16, 8, block_size=4, dropout=1.0, init_weights=False)
    x = torch.randn(3, 16)
    assert layer.training
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.eval()
    expected = x @ layer.get_rotation() @ layer.base_layer.weight.T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_coft_projects_each_block_before_use() -> None:
    torch.manual_seed(10)
    eps = 1e-2
    layer = OFTLinear(16, 8, block_size=4, coft=True, eps=eps, init_weights=False)
    weight = layer.oft_R["default"].weight
    with torch.no_grad():
        weight[0].mul_(1e-4)  # inside the ball: kept as it is
    inside = weight[0].detach().clone()
    x = torch.randn(3, 16)
    out = layer(x)
    norms = 2**0.5 * torch.linalg.vector_norm(weight.detach(), dim=-1)
    radius = eps / 4**0.5
    torch.testing.assert_close(norms[1:], torch.full((3,), radius))
    torch.testing.assert_close(weight[0].detach(), inside, rtol=0, atol=0)
    rotation = reference_rotation(layer, "default", weight.detach())
    torch.testing.assert_close(out, x @ rotation @ layer.base_layer.weight.T + layer.base_layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coft_projection_is_idempotent(dtype: torch.dtype) -> None:
    packed = torch.randn(64, 28, dtype=dtype)
    once = project_packed_skew(packed, 0.1)
    assert torch.equal(project_packed_skew(once, 0.1), once)
    layer = OFTLinear(32, 8, block_size=8, coft=True, eps=0.1, init_weights=False, dtype=dtype)
    x = torch.randn(3, 32, dtype=dtype)
    assert torch.equal(layer(x), layer(x))


def test_wraps_transformers_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(11)
    conv1d = Conv1D(12, 32)  # weight (in=32, out=12)
    layer = OFTLinear.from_module(conv1d, block_size=8, init_weights=False)
    assert layer.fan_in_fan_out and layer.in_features == 32 and layer.out_features == 12
    assert layer.base_layer.weight is conv1d.weight
    x = torch.randn(2, 5, 32)
    rotation = layer.get_rotation()
    expected = x @ rotation @ conv1d.weight + conv1d.bias
    torch.testing.assert_close(layer(x), expected)
    original = conv1d.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(conv1d.weight, rotation @ original)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(conv1d.weight, original)
    with pytest.raises(ValueError, match=r"fan_in_fan_out=True does not fit an nn\.Linear"):
        OFTLinear.from_module(nn.Linear(32, 12), fan_in_fan_out=True, block_size=8)


def test_from_module_shares_parameters() -> None:
    linear = nn.Linear(32, 16)
    layer = OFTLinear.from_module(linear, adapter_name="task", block_size=8)
    assert layer.base_layer is linear and layer.base_layer.weight is linear.weight
    assert layer.active_adapters == ["task"] and list(layer.oft_R) == ["task"]
    assert not linear.weight.requires_grad


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"block_size": 10}, r"OFTLinear 'blocks.0.attn': block_size=10 .*in_features=48.* 4, 6, 8, 12$"),
        ({"r": 5, "block_size": 0}, r"r=5 .*in_features=48.* 2, 3, 4, 6$"),
        ({"r": 48, "block_size": 0}, r"r=48 .* 8, 12, 16, 24$"),
        ({"r": 4, "block_size": 12}, r"exactly one of r and block_size.*r=4, block_size=12"),
        ({"r": 0, "block_size": 0}, r"exactly one of r and block_size"),
        ({"block_size": -8}, r"block_size must be an integer >= 0, got -8"),
        ({"block_size": 8, "dropout": 1.5}, r"dropout must be a probability in \[0, 1\], got 1.5"),
        ({"block_size": 8, "eps": 0.0}, r"eps must be a positive number, got 0.0"),
        (
            {"block_size": 8, "num_cayley_neumann_terms": 0},
            r"num_cayley_neumann_terms must be an integer >= 1",
        ),
        ({"block_size": 8, "init_weights": "gaussian"}, r"init_weights must be True or False"),
    ],
)
def test_invalid_options_name_layer_argument_value_and_valid_values(
    options: dict[str, object], pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        OFTLinear.from_module(nn.Linear(48, 8), layer_name="blocks.0.attn", **options)


def test_unsupported_base_layer_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"Embedding.*supported base layers: torch.nn.Linear"):
        OFTLinear.from_module(nn.Embedding(10, 16), block_size=4)
    with pytest.raises(TypeError, match=r"Conv2d.*supported"):
        OFTLinear.from_module(nn.Conv2d(4, 4, 3), block_size=4)


def test_input_on_another_device_is_rejected() -> None:
    layer = OFTLinear(16, 8, block_size=4)
    with pytest.raises(ValueError, match="OFTLinear: the input is on meta but the layer is on cpu"):
        layer(torch.empty(2, 16, device="meta"))


def test_extra_repr_shows_dimensions_options_and_active_adapters() -> None:
    layer = OFTLinear(48, 20, block_size=8, coft=True)
    layer.add_adapter("second", r=4, block_size=0)
    text = repr(layer)
    assert "in_features=48, out_features=20" in text
    assert "active_adapters=['default']" in text
    assert re.search(r"default: r=6, block_size=8, .*coft=True", text)
    assert re.search(r"second: r=4, block_size=12", text)


def test_training_changes_only_adapter_parameters_and_reduces_loss() -> None:
    torch.manual_seed(12)
    layer = OFTLinear(16, 8, block_size=4)
    x = torch.randn(64, 16)
    target = layer(x).detach() @ torch.linalg.qr(torch.randn(8, 8))[0]
    losses = train_adapters(layer, x, target, steps=15)
    assert losses[-1] < 0.9 * losses[0]
    assert torch.count_nonzero(layer.oft_R["default"].weight) > 0
