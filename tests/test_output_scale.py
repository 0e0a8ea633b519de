"""BOFT's output scale: the same gradients as the plain expression, keeping only the output for backward."""

from __future__ import annotations

import pytest
import torch

from orthoft.layers import BOFTLinear, OFTLinear
from orthoft.layers.output_scale import scale_output

from helpers import saved_bytes


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_match_the_plain_expression(with_bias: bool) -> None:
    out = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    scale = (1 + 0.3 * torch.randn(6, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True) if with_bias else None
    torch.autograd.gradcheck(scale_output, (out, scale, bias))
    grad = torch.randn(3, 5, 6, dtype=torch.float64)
    inputs = [t for t in (out, scale, bias) if t is not None]
    ours = torch.autograd.grad(scale_output(out, scale, bias), inputs, grad)
    plain = out * scale + (0 if bias is None else bias)
    torch.testing.assert_close(ours, torch.autograd.grad(plain, inputs, grad))


def test_boft_keeps_no_output_sized_tensor_beyond_oft() -> None:
    torch.manual_seed(5)
    x = torch.randn(256, 64)
    oft = OFTLinear(64, 512, block_size=8)
    boft = BOFTLinear(64, 512, block_size=8)
    output_bytes = 256 * 512 * 4
    # BOFT's extra tensors are its blocks and scale (tiny), never an output-sized activation.
    assert saved_bytes(boft, x) - saved_bytes(oft, x) < output_bytes // 4


def test_boft_linear_compiles_without_graph_breaks() -> None:
    torch.manual_seed(6)
    layer = BOFTLinear(32, 16, block_size=4, n_butterfly_factor=2, init_weights=False)
    x = torch.randn(5, 32)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad()
    layer(x).square().sum().backward()
    torch.testing.assert_close(grads, [p.grad for p in layer.parameters() if p.requires_grad])
