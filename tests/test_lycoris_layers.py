"""The output-side layers (LyCORIS diag-OFT and BOFT) against LyCORIS's own modules and hand-built weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from orthoft.layers import LycorisConv2d, LycorisLinear
from orthoft.layers.output_rotation import lycoris_block_split, lycoris_butterfly_split

from helpers import train_adapters

lycoris = pytest.importorskip("lycoris")
from lycoris.functional.general import factorization, power2factorization  # noqa: E402
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402

LYCORIS_MODULES = {"diag-oft": DiagOFTModule, "boft": ButterflyOFTModule}


def test_block_splits_are_lycoris_own() -> None:
    for dim in range(1, 200):
        for size in (-1, 1, 2, 3, 4, 6, 8, 16, 32, 64):
            assert lycoris_block_split(dim, size) == factorization(dim, size), (dim, size)
            expected = power2factorization(dim, size)
            split = lycoris_butterfly_split(dim, size)
            assert (split is None) == (expected[1] == 0), (dim, size)
            if split is not None:
                assert split[:2] == expected and 2 ** (split[2] - 1) == split[1]


def _lycoris_module(
    algo: str, base: nn.Module, block_size: int, constraint: float, rescaled: bool
) -> nn.Module:
    module = LYCORIS_MODULES[algo](
        "lycoris_layer", copy.deepcopy(base), 1, lora_dim=block_size, constraint=constraint, rescaled=rescaled
    )
    with torch.no_grad():
        module.oft_blocks.normal_(0, 0.2)
        if rescaled:
            module.rescale.normal_(1, 0.1)
    module.apply_to()
    return module


def _orthoft_copy(module: nn.Module, base: nn.Module, algo: str, **options: object) -> nn.Module:
    layer_cls = LycorisConv2d if isinstance(base, nn.Conv2d) else LycorisLinear
    layer = layer_cls.from_module(copy.deepcopy(base), algo=algo, **options)
    tensors = {"lycoris.oft_blocks": module.oft_blocks.detach()}
    if options.get("rescaled"):
        tensors["lycoris.rescale"] = module.rescale.detach()
    layer.load_adapter_state_dict("default", tensors)
    return layer


BASES = {
    "linear": (lambda: nn.Linear(24, 64), (3, 5, 24)),
    "conv": (lambda: nn.Conv2d(6, 32, 3, padding=1), (2, 6, 5, 5)),
    # 128 channels in blocks of 2: 7 BOFT stages, rotated on channels-last rows rather than dense chunks.
    "conv-many-stages": (lambda: nn.Conv2d(4, 128, 1), (2, 4, 3, 3)),
}


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize(("constraint", "rescaled"), [(0.0, False), (1e-3, False), (0.0, True), (1e-3, True)])
def test_equals_lycoris_weight_mode(algo: str, base_name: str, constraint: float, rescaled: bool) -> None:
    make, shape = BASES[base_name]
    base = make()
    block_size = 2 if base_name == "conv-many-stages" else 4
    module = _lycoris_module(algo, base, block_size, constraint, rescaled)
    layer = _orthoft_copy(module, base, algo, block_size=block_size, constraint=constraint, rescaled=rescaled)
    x = torch.randn(shape)
    expected = module(x)  # LyCORIS's default (weight) mode: the rotated weight, the bias as it is
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # The same trained gradient for the blocks.
    module.oft_blocks.grad = None
    grad_out = torch.randn_like(expected)
    (module(x) * grad_out).sum().backward()
    (layer(x) * grad_out).sum().backward()
    torch.testing.assert_close(
        layer.lycoris["default"].oft_blocks.grad, module.oft_blocks.grad, atol=1e-4, rtol=1e-4
    )
    merged_weight, _ = module.get_merged_weight()
    layer.merge()
    torch.testing.assert_close(
        layer.base_layer.weight, merged_weight.view_as(base.weight), atol=1e-5, rtol=1e-5
    )


def _hand_merged(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``(A @ W) * rescale`` from the dense ``A`` built blockwise from LyCORIS's formulas, in float64."""
    adapter = layer.lycoris["default"]
    options = layer.adapter_options["default"]
    blocks = adapter.oft_blocks.detach().double()
    skew = blocks - blocks.mT
    eye = torch.eye(blocks.shape[-1], dtype=torch.float64)
    rotations = (eye + skew) @ torch.linalg.inv(eye - skew)
    assert options.algo == "diag-oft"
    matrix = torch.block_diag(*rotations.mT) @ weight.reshape(weight.shape[0], -1)
    if adapter.rescale is not None:
        matrix = matrix * adapter.rescale.detach().reshape(-1, 1)
    return matrix.reshape(weight.shape)


def test_conv1d_rotates_its_output_columns() -> None:
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(16, 12).double()  # weight (in=12, out=16)
    with torch.no_grad():
        conv1d.bias.normal_()
    layer = LycorisLinear.from_module(conv1d, block_size=4, rescaled=True, init_weights=False)
    x = torch.randn(3, 12, dtype=torch.float64)
    merged = _hand_merged(layer, conv1d.weight.detach().mT.clone())
    torch.testing.assert_close(layer(x), x @ merged.mT + conv1d.bias, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
@pytest.mark.parametrize("base_name", ["linear", "conv"])
def test_identity_at_init_trains_and_merges_exactly(algo: str, base_name: str) -> None:
    make, shape = BASES[base_name]
    base = make().double()
    layer_cls = LycorisConv2d if base_name == "conv" else LycorisLinear
    layer = layer_cls.from_module(base, algo=algo, block_size=4, rescaled=True, constraint=0.01)
    x = torch.randn(shape, dtype=torch.float64)
    original = base(x)
    assert torch.equal(layer(x), original) or torch.allclose(layer(x), original, atol=1e-14, rtol=0)
    losses = train_adapters(layer, x, torch.randn_like(original), steps=5)
    assert losses[-1] < losses[0]
    weight = base.weight.detach().clone()
    adapted = layer(x)
    layer.merge()
    torch.testing.assert_close(base(x), adapted, atol=1e-12, rtol=1e-12)
    layer.unmerge()
    assert torch.equal(base.weight, weight)


def test_hand_built_merge_in_float64() -> None:
    base = nn.Linear(10, 32).double()
    layer = LycorisLinear.from_module(base, block_size=8, rescaled=True, init_weights=False)
    x = torch.randn(4, 10, dtype=torch.float64)
    merged = _hand_merged(layer, base.weight.detach())
    torch.testing.assert_close(layer(x), x @ merged.mT + base.bias, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.get_delta_weight(), merged - base.weight, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("base_name", ["linear", "conv"])
def test_two_adapters_compose_in_order(base_name: str) -> None:
    make, shape = BASES[base_name]
    base = make().double()
    layer_cls = LycorisConv2d if base_name == "conv" else LycorisLinear
    layer = layer_cls.from_module(base, block_size=4, rescaled=True, init_weights=False)
    layer.add_adapter("second", algo="boft", block_size=4, rescaled=True, init_weights=False)
    layer.set_adapter(["default", "second"])
    x = torch.randn(shape, dtype=torch.float64)
    both = layer(x)
    first = layer_cls.from_module(copy.deepcopy(base), block_size=4, rescaled=True)
    first.load_adapter_state_dict("default", layer.adapter_state_dict("default"))
    first.merge()
    second = layer_cls.from_module(first.base_layer, algo="boft", block_size=4, rescaled=True)
    second.load_adapter_state_dict("default", layer.adapter_state_dict("second"))
    torch.testing.assert_close(both, second(x), atol=1e-12, rtol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x), both, atol=1e-12, rtol=1e-12)


def test_unsplittable_size_names_the_layer_and_valid_sizes() -> None:
    with pytest.raises(
        ValueError, match=r"boft with block_size=4 cannot split out_features=24.*block_size values"
    ):
        LycorisLinear(4, 24, algo="boft", block_size=4)
    with pytest.raises(ValueError, match=r"algo must be one of"):
        LycorisLinear(4, 24, algo="lora")
    with pytest.raises(ValueError, match=r"cannot split out_features=13"):
        LycorisLinear(4, 13, block_size=4)


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
@pytest.mark.parametrize("base_name", list(BASES))
def test_device_matches_cpu(device: str, algo: str, base_name: str) -> None:
    make, shape = BASES[base_name]
    layer_cls = LycorisLinear if base_name == "linear" else LycorisConv2d
    layer = layer_cls.from_module(make(), algo=algo, block_size=2, rescaled=True, init_weights=False)
    moved = copy.deepcopy(layer).to(device)
    x = torch.randn(shape)
    out, moved_out = layer(x), moved(x.to(device))
    torch.testing.assert_close(moved_out.cpu(), out, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    moved_out.square().sum().backward()
    grad, moved_grad = layer.lycoris["default"].oft_blocks.grad, moved.lycoris["default"].oft_blocks.grad
    torch.testing.assert_close(moved_grad.cpu(), grad, atol=1e-4, rtol=1e-4)
