"""The layers against PEFT's OFT and BOFT layers, given the same base layer and adapter tensors.

PEFT's OFT Conv2d is compared from PEFT 0.22 on, which rotates the weight as orthoft does; before, it
unfolded and folded the input, so it differed from its base conv even at init (tests/test_layers_conv.py
checks orthoft's against the base and hand-built convs whatever PEFT is installed).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import BOFTConfig, OFTConfig
from peft.tuners.boft import layer as peft_boft
from peft.tuners.oft import layer as peft_oft
from torch import nn

from orthoft import reference
from orthoft.layers import BOFTConv2d, BOFTLinear, OFTConv2d, OFTLinear, OrthoftLayer

from peft_interop import PEFT_OFT_CONV_EXACT

pytestmark = pytest.mark.filterwarnings(
    "ignore:Failed to load the CUDA extension", "ignore:Setting boft_n_butterfly_factor to 1"
)


class _BlockDiagOnCpu:
    """Stands in for PEFT's CUDA block-diagonal extension, so PEFT runs several butterfly factors on CPU."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [reference.block_diag(blocks)]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        return [reference.block_diag_backward(grad, blocks.shape[-1])]


@pytest.fixture
def peft_with_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", _BlockDiagOnCpu())


def adapter_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in layer.state_dict().items() if not name.startswith("base_layer.")}


def load_peft_adapter(layer: OrthoftLayer, peft_layer: nn.Module) -> None:
    """Copies PEFT's adapter tensors into ``layer``: the state dict keys must match one to one."""
    state = adapter_state(peft_layer)
    assert set(state) == set(adapter_state(layer))
    layer.load_state_dict(state, strict=False)


def adapter_params(layer: nn.Module) -> list[torch.Tensor]:
    return [layer.boft_R["default"], layer.boft_s["default"]]


@pytest.mark.parametrize(
    "options",
    [
        {"oft_block_size": 8, "use_cayley_neumann": False},
        {"oft_block_size": 8, "num_cayley_neumann_terms": 2},
        {"oft_block_size": 8, "num_cayley_neumann_terms": 3},
        {"oft_block_size": 8, "num_cayley_neumann_terms": 5},
        {"oft_block_size": 16, "num_cayley_neumann_terms": 9},
        {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False},
        {"oft_block_size": 8, "block_share": True, "use_cayley_neumann": False},
        {"oft_block_size": 8, "block_share": True},
        {"oft_block_size": 8, "coft": True, "eps": 3e-2},
        {"oft_block_size": 8, "coft": True, "eps": 3e-2, "use_cayley_neumann": False},
    ],
)
def test_oft_linear_matches_peft(options: dict[str, object]) -> None:
    torch.manual_seed(0)
    base = nn.Linear(48, 20, dtype=torch.float64)
    config = OFTConfig(init_weights=False, **options)
    peft_layer = peft_oft.Linear(copy.deepcopy(base), "default", config=config, r=config.r)
    with torch.no_grad():
        peft_layer.oft_R["default"].weight.normal_(0.0, 0.3)
    layer = OFTLinear.from_module(
        base,
        r=config.r,
        block_size=config.oft_block_size,
        coft=config.coft,
        eps=config.eps,
        block_share=config.block_share,
        use_cayley_neumann=config.use_cayley_neumann,
        num_cayley_neumann_terms=config.num_cayley_neumann_terms,
    )
    load_peft_adapter(layer, peft_layer)
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    torch.testing.assert_close(layer(x), peft_layer(x))
    # With COFT both have projected their parameter in place.
    torch.testing.assert_close(layer.oft_R["default"].weight, peft_layer.oft_R["default"].weight)

    peft_layer.merge()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight)


@pytest.mark.skipif(not PEFT_OFT_CONV_EXACT, reason="PEFT's OFT Conv2d is exact from 0.22 on")
@pytest.mark.parametrize(
    ("conv_args", "options"),
    [
        ({"kernel_size": 3, "padding": 1}, {"oft_block_size": 12}),
        ({"kernel_size": (3, 2), "stride": 2, "dilation": (1, 2)}, {"oft_block_size": 6}),
        ({"kernel_size": 1, "bias": False}, {"oft_block_size": 4, "use_cayley_neumann": False}),
        ({"kernel_size": 3, "padding": 2, "padding_mode": "reflect"}, {"r": 4, "oft_block_size": 0}),
    ],
)
def test_oft_conv2d_matches_peft(conv_args: dict[str, object], options: dict[str, object]) -> None:
    torch.manual_seed(5)
    base = nn.Conv2d(4, 6, dtype=torch.float64, **conv_args)  # type: ignore[arg-type]
    config = OFTConfig(init_weights=False, **options)
    peft_layer = peft_oft.Conv2d(copy.deepcopy(base), "default", config=config, r=config.r)
    with torch.no_grad():
        peft_layer.oft_R["default"].weight.normal_(0.0, 0.3)
    layer = OFTConv2d.from_module(
        base,
        r=config.r,
        block_size=config.oft_block_size,
        use_cayley_neumann=config.use_cayley_neumann,
        num_cayley_neumann_terms=config.num_cayley_neumann_terms,
    )
    load_peft_adapter(layer, peft_layer)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), peft_layer(x))
    peft_layer.merge()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight)


def test_boft_linear_matches_peft_with_one_factor() -> None:
    torch.manual_seed(1)
    base = nn.Linear(32, 12, dtype=torch.float64)
    peft_layer = peft_boft.Linear(
        copy.deepcopy(base), "default", config=BOFTConfig(boft_block_size=4, init_weights=False)
    )
    assert not peft_layer.fbd_cuda_available
    layer = BOFTLinear.from_module(base, block_size=4)
    load_peft_adapter(layer, peft_layer)
    x = torch.randn(4, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), peft_layer(x))
    peft_layer.merge()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight)


@pytest.mark.usefixtures("peft_with_factors")
@pytest.mark.parametrize(
    ("in_features", "options"),
    [
        (32, {"boft_block_size": 4, "boft_n_butterfly_factor": 2}),
        (32, {"boft_block_size": 2, "boft_n_butterfly_factor": 3}),
        (64, {"boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 4}),
        (64, {"boft_block_size": 4, "boft_n_butterfly_factor": 5}),
        (96, {"boft_block_size": 6, "boft_n_butterfly_factor": 3}),
    ],
)
def test_boft_linear_matches_peft_with_several_factors(in_features: int, options: dict[str, int]) -> None:
    torch.manual_seed(2)
    base = nn.Linear(in_features, 12, dtype=torch.float64)
    config = BOFTConfig(init_weights=False, **options)
    peft_layer = peft_boft.Linear(copy.deepcopy(base), "default", config=config)
    layer = BOFTLinear.from_module(
        base,
        block_size=config.boft_block_size,
        block_num=config.boft_block_num,
        n_butterfly_factor=config.boft_n_butterfly_factor,
    )
    load_peft_adapter(layer, peft_layer)
    x = torch.randn(4, in_features, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, peft_layer(x))

    # PEFT's dense construction, from the reference.
    blocks = layer.boft_R["default"].detach()
    m, d, b, _ = blocks.shape
    rotations = reference.cayley((0.5 * (blocks - blocks.mT)).reshape(m * d, b, b)).reshape(m, d, b, b)
    dense = reference.butterfly_matrix(rotations, b)
    torch.testing.assert_close(layer.get_rotation(), dense)
    expected = (x @ dense @ base.weight.T) * layer.boft_s["default"].T + base.bias
    torch.testing.assert_close(out, expected)

    grad = torch.randn_like(out)
    peft_grads = torch.autograd.grad(peft_layer(x), [x, *adapter_params(peft_layer)], grad)
    ours = torch.autograd.grad(out, [x, *adapter_params(layer)], grad)
    for mine, theirs in zip(ours, peft_grads, strict=True):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.usefixtures("peft_with_factors")
@pytest.mark.parametrize(("n", "block_size", "factors"), [(32, 4, 3), (64, 2, 6), (48, 6, 2), (128, 8, 4)])
def test_butterfly_permutation_matches_peft(n: int, block_size: int, factors: int) -> None:
    config = BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=factors)
    peft_layer = peft_boft.Linear(nn.Linear(n, 4), "default", config=config)
    block_num = n // block_size
    for i in range(factors):
        perm = reference.butterfly_permutation(n, block_size, i)
        peft_perm = peft_layer.block_butterfly_perm(n, block_num // 2**i, block_size // 2, factors - 1)
        assert torch.equal(perm, peft_perm)
        matrix = torch.zeros(n, n)
        matrix[torch.arange(n), perm] = 1
        assert torch.equal(peft_layer.boft_P[i], matrix)


@pytest.mark.parametrize(
    ("conv_args", "options"),
    [
        ({"kernel_size": 3, "padding": 1}, {"boft_block_size": 4}),
        ({"kernel_size": 3, "stride": 2}, {"boft_block_size": 0, "boft_block_num": 6}),
        ({"kernel_size": 1, "bias": False}, {"boft_block_size": 2}),
    ],
)
def test_boft_conv2d_matches_peft_with_one_factor(
    conv_args: dict[str, object], options: dict[str, int]
) -> None:
    torch.manual_seed(3)
    base = nn.Conv2d(4, 6, dtype=torch.float64, **conv_args)
    config = BOFTConfig(init_weights=False, **options)
    peft_layer = peft_boft.Conv2d(copy.deepcopy(base), "default", config=config)
    layer = BOFTConv2d.from_module(base, block_size=config.boft_block_size, block_num=config.boft_block_num)
    load_peft_adapter(layer, peft_layer)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), peft_layer(x))
    peft_layer.merge()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight)


@pytest.mark.usefixtures("peft_with_factors")
def test_boft_conv2d_matches_peft_with_several_factors() -> None:
    torch.manual_seed(4)
    base = nn.Conv2d(8, 6, 3, padding=1, dtype=torch.float64)  # F = 72 = 2 * 4 * 9
    config = BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3, init_weights=False)
    peft_layer = peft_boft.Conv2d(copy.deepcopy(base), "default", config=config)
    layer = BOFTConv2d.from_module(base, block_size=2, n_butterfly_factor=3)
    load_peft_adapter(layer, peft_layer)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), peft_layer(x))
