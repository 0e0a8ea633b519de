"""Shared test helpers: random inputs, tolerances and what autograd keeps."""

from __future__ import annotations

import torch

# Relative error bounds (||out - ref|| / ||ref||) for each dtype against a float64 reference.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_skew(*shape: int, scale: float = 0.5, dtype: torch.dtype = torch.float64, device: str = "cpu"):
    a = torch.randn(*shape, dtype=dtype, device=device) * scale
    return a - a.mT


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided, non-contiguous layout."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all()
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    assert err <= REL_TOL[dtype], f"relative error {err:.3e} over {REL_TOL[dtype]:.1e} for {dtype}"


def train_adapters(layer: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int) -> list[float]:
    """Adam steps on ``layer``'s trainable parameters towards ``target``; returns the losses.

    Checks that the frozen parameters are exactly the base layer's weight and bias and that the
    steps leave them untouched.
    """
    frozen = {name: p.detach().clone() for name, p in layer.named_parameters() if not p.requires_grad}
    assert set(frozen) == {"base_layer.weight", "base_layer.bias"}
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for name, parameter in layer.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name])
    return losses


def saved_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes that autograd keeps for backward in one forward, each storage counted once, other than the
    layer's output (which the model's next operation holds anyway)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    storages.pop(out.untyped_storage().data_ptr(), None)
    return sum(storages.values())
