"""Shared test helpers: random inputs and tolerances."""

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
