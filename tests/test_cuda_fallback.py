"""The reference kernels a build without CUDA kernels registers for CUDA tensors, run here on CPU.

Each must compute its own operator: compared with the compiled CPU kernel of that operator, so that
registering the wrong reference function, or one with other outputs, fails here without a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from orthoft import _library, reference

from helpers import random_skew


def _cases() -> dict[str, tuple]:
    x = torch.randn(6, 32, dtype=torch.float64)
    rotations = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    skew = random_skew(5, 6, 6, scale=0.2)
    return {
        "block_diag": (torch.randn(2, 3, 4, 4, dtype=torch.float64),),
        "block_diag_backward": (torch.randn(2, 12, 12, dtype=torch.float64), 4),
        "cayley": (skew, 5),
        "cayley_backward": (torch.randn_like(skew), skew, reference.cayley(skew), 0),
        "butterfly": (x, rotations, 4),
        "butterfly_backward": (torch.randn_like(x), x, rotations, 4, [True, True]),
    }


def test_every_operator_has_a_fallback() -> None:
    assert set(_library.CUDA_FALLBACKS) == set(_cases()) == set(_library._OPS)


@pytest.mark.parametrize("name", sorted(_cases()))
def test_fallback_computes_its_operator(name: str) -> None:
    args = _cases()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _library.CUDA_FALLBACKS[name](*args)
    want = getattr(torch.ops.orthoft, name).default(*args)
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_fallback_respects_the_output_mask() -> None:
    grad, x, rotations, b, _ = _cases()["butterfly_backward"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grad_x, grad_rotations = _library.CUDA_FALLBACKS["butterfly_backward"](
            grad, x, rotations, b, [False, True]
        )
    assert grad_x.shape == (0,)
    torch.testing.assert_close(grad_rotations, reference.butterfly_backward(grad, x, rotations, b)[1])


def test_fallback_warns_once() -> None:
    _library._warn_no_cuda_kernels.cache_clear()
    args = _cases()["block_diag"]
    with pytest.warns(UserWarning, match="built without CUDA kernels") as record:
        _library.CUDA_FALLBACKS["block_diag"](*args)
        _library.CUDA_FALLBACKS["cayley"](*_cases()["cayley"])
    assert len(record) == 1
