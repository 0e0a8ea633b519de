"""Every layer computes the same on the CUDA kernels as on the CPU kernels (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthoft
from orthoft.layers import BOFTConv2d, BOFTLinear, OFTConv2d, OFTLinear, OrthoftLayer

pytestmark = pytest.mark.cuda


def _randomise_adapters(layer: OrthoftLayer) -> None:
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "base_layer" not in name:
                param.copy_(torch.randn_like(param) * 0.1 + (1 if name.startswith("boft_s") else 0))


LAYERS = {
    "oft_linear": lambda: OFTLinear.from_module(nn.Linear(64, 48), block_size=16),
    "oft_linear_neumann_shared": lambda: OFTLinear.from_module(
        nn.Linear(64, 48), block_size=8, block_share=True, num_cayley_neumann_terms=7
    ),
    "boft_linear": lambda: BOFTLinear.from_module(nn.Linear(64, 32), block_size=4, n_butterfly_factor=3),
    "oft_conv": lambda: OFTConv2d.from_module(nn.Conv2d(8, 6, (3, 2), padding=1, groups=2), block_size=4),
    "boft_conv": lambda: BOFTConv2d.from_module(
        nn.Conv2d(4, 8, 3, dilation=2, padding_mode="reflect", padding=2), block_size=4, n_butterfly_factor=2
    ),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(kind: str, dtype: torch.dtype) -> None:
    if not orthoft.cuda_kernels_available():
        pytest.skip("orthoft was built without CUDA kernels")
    cpu = LAYERS[kind]()
    _randomise_adapters(cpu)
    gpu = copy.deepcopy(cpu).to("cuda")
    cpu, gpu = cpu.to(dtype), gpu.to(dtype)
    shape = (5, 7, 64) if "linear" in kind else (3, cpu.base_layer.in_channels, 9, 10)
    x = torch.randn(shape).to(dtype)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.cuda().requires_grad_()
    y_cpu, y_gpu = cpu(x_cpu), gpu(x_gpu)
    grad = torch.randn_like(y_cpu)
    y_cpu.backward(grad)
    y_gpu.backward(grad.cuda())
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, **tol)
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, **tol)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if p_cpu.requires_grad:
            torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, **tol, msg=name)
