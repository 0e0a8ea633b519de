"""``rotate_expert_weights``: every expert's weight times its own rotation, against dense per-expert
products in float64 and ``gradcheck`` of its backward (which recomputes what it does not keep)."""

from __future__ import annotations

import pytest
import torch

from orthoft import reference
from orthoft.layers.expert_rotation import GROUPS, rotate_expert_weights
from orthoft.layers.rotation import block_skew, cayley_blocks

from helpers import assert_close_rel


def _case(experts: int, factors: int, transposed: bool) -> tuple[torch.Tensor, ...]:
    out, features, b = 5, 16, 4
    shape = (experts, features, out) if transposed else (experts, out, features)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(factors, experts * features // b, b, b, dtype=torch.float64)
    rotations = cayley_blocks(block_skew(raw), 0).detach().requires_grad_()
    scale = (1 + 0.1 * torch.randn(experts * out, dtype=torch.float64)).requires_grad_()
    return weight, rotations, scale


def _dense(
    weight: torch.Tensor, rotations: torch.Tensor, scale: torch.Tensor, transposed: bool
) -> torch.Tensor:
    experts, b = weight.shape[0], rotations.shape[-1]
    d = rotations.shape[1] // experts
    result = []
    for e in range(experts):
        rotation = reference.butterfly_matrix(rotations[:, e * d : (e + 1) * d], b)
        matrix = weight[e].mT if transposed else weight[e]
        rotated = (matrix @ rotation.mT) * scale.view(experts, -1)[e][:, None]
        result.append(rotated.mT if transposed else rotated)
    return torch.stack(result)


# More experts than groups, and a count that the groups do not divide.
@pytest.mark.parametrize("experts", [1, 3, 2 * GROUPS + 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("factors", [1, 2])
def test_matches_dense_products_and_gradients(experts: int, transposed: bool, factors: int) -> None:
    weight, rotations, scale = _case(experts, factors, transposed)
    out = rotate_expert_weights(weight, rotations, 4, scale, transposed=transposed)
    expected = _dense(weight, rotations, scale, transposed)
    assert out.is_contiguous() and out.shape == weight.shape
    assert_close_rel(out, expected, torch.float64)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (weight, rotations, scale), grad)
    theirs = torch.autograd.grad(expected, (weight, rotations, scale), grad)
    for a, b in zip(ours, theirs, strict=True):
        assert_close_rel(a, b, torch.float64)


def test_gradcheck() -> None:
    weight, rotations, scale = _case(GROUPS + 1, 2, False)
    small = (
        weight.detach()[:, :2].requires_grad_(),
        rotations,
        scale.detach()[: 2 * (GROUPS + 1)].requires_grad_(),
    )
    assert torch.autograd.gradcheck(lambda w, r, s: rotate_expert_weights(w, r, 4, s), small, fast_mode=True)
    assert torch.autograd.gradcheck(lambda w, r: rotate_expert_weights(w, r, 4), small[:2], fast_mode=True)
