"""The training-time check of the Cayley-Neumann series' rotations (see ``orthoft.orthogonality``).

On the first training forward of each adapter of each layer and then every ``every`` forwards, the rotation
blocks the forward has just built are measured (a few ``b x b`` products outside autograd, and one
synchronisation); past ``threshold`` it warns once per layer, or raises. Only the series is checked: the
exact transform is orthogonal to rounding. ``set_orthogonality_check`` sets it for the process: it is not
an adapter option, as it changes nothing the adapter computes and has no place in ``adapter_config.json``.
It is skipped inside ``torch.compile``d graphs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .base import OrthoftLayer

__all__ = [
    "CHECK_MODES",
    "OrthogonalityCheck",
    "OrthogonalityError",
    "OrthogonalityWarning",
    "check_series_rotation",
    "orthogonality_check",
    "rotation_error",
    "set_orthogonality_check",
    "skew_norm",
]

CHECK_MODES = ("warn", "raise", "off")


class OrthogonalityWarning(UserWarning):
    """A layer's Cayley-Neumann rotation is far from orthogonal."""


class OrthogonalityError(RuntimeError):
    """As ``OrthogonalityWarning``, raised with ``set_orthogonality_check(mode="raise")``."""


@dataclass(frozen=True)
class OrthogonalityCheck:
    """The training-time check: ``mode`` "warn" (once per layer), "raise" or "off"; measured on the first
    training forward of each adapter and then every ``every`` forwards; ``threshold`` on ``||R^T R - I||_2``
    (0.01: norms change by up to about 1 %; 5 series terms reach it at ``||Q||_2`` about 0.27)."""

    mode: str = "warn"
    every: int = 100
    threshold: float = 1e-2

    def __post_init__(self) -> None:
        if self.mode not in CHECK_MODES:
            raise ValueError(f"orthogonality check: mode must be one of {CHECK_MODES}, got {self.mode!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"orthogonality check: every must be an integer >= 1, got {self.every!r}")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"orthogonality check: threshold must be a positive number, got {threshold!r}")


_settings = OrthogonalityCheck()
# Per layer (held weakly): training forwards counted per adapter, and whether it has warned.
_forwards: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()
_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def set_orthogonality_check(
    *, mode: str | None = None, every: int | None = None, threshold: float | None = None
) -> OrthogonalityCheck:
    """Changes the given settings of the training-time check for this process; returns the previous ones."""
    global _settings
    previous = _settings
    changes = {"mode": mode, "every": every, "threshold": threshold}
    _settings = dataclasses.replace(previous, **{k: v for k, v in changes.items() if v is not None})
    return previous


@contextlib.contextmanager
def orthogonality_check(
    *, mode: str | None = None, every: int | None = None, threshold: float | None = None
) -> Iterator[OrthogonalityCheck]:
    """``set_orthogonality_check`` for the ``with`` block only."""
    global _settings
    previous = set_orthogonality_check(mode=mode, every=every, threshold=threshold)
    try:
        yield _settings
    finally:
        _settings = previous


def _largest_symmetric_eigenvalue(matrices: torch.Tensor) -> torch.Tensor:
    """``max |eigenvalue|`` over a batch of symmetric matrices ``(..., b, b)``: their spectral norm."""
    return torch.linalg.eigvalsh(matrices).abs().amax()


def rotation_error(blocks: torch.Tensor) -> torch.Tensor:
    """``max ||R^T R - I||_2`` over rotation blocks ``(..., b, b)``, as a 0-d tensor."""
    b = blocks.shape[-1]
    eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
    return _largest_symmetric_eigenvalue(blocks.mT @ blocks - eye)


def skew_norm(skew: torch.Tensor) -> torch.Tensor:
    """``max ||Q||_2`` over skew blocks ``(..., b, b)`` (``Q^T Q = -Q^2`` is symmetric)."""
    return _largest_symmetric_eigenvalue(skew.mT @ skew).sqrt()


def _advice(layer: OrthoftLayer, adapter_name: str, terms: int, norm: float, error: float) -> str:
    return (
        f"{layer.label}, adapter {adapter_name!r}: the Cayley-Neumann series ({terms} terms) is no longer a "
        f"rotation: ||Q||_2 = {norm:.3g} (the series holds only well below 1), ||R^T R - I||_2 = {error:.3g} "
        f"(threshold {_settings.threshold:g}). Train with the exact Cayley transform (use_cayley_neumann="
        "False; orthoft.convert_cayley_form keeps what is trained so far), bound ||Q|| with coft=True, or "
        "lower the learning rate. orthoft.set_orthogonality_check(mode='raise' or 'off', every=..., "
        "threshold=...) changes this check; it warns once per layer."
    )


def check_series_rotation(
    layer: OrthoftLayer, adapter_name: str, skew: torch.Tensor, blocks: torch.Tensor, terms: int
) -> None:
    """The training-time check, called by a layer's training forward with the skew blocks and the rotation
    blocks it has just built from them by a series of ``terms`` terms."""
    settings = _settings
    if settings.mode == "off" or torch.compiler.is_compiling():
        return
    counts = _forwards.setdefault(layer, {})
    count = counts.get(adapter_name, 0)
    counts[adapter_name] = count + 1
    if count % settings.every or (settings.mode == "warn" and layer in _warned):
        return
    with torch.no_grad():
        blocks = blocks.detach()
        eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
        # The Frobenius norm bounds the spectral one: a healthy adapter costs one batched product.
        if float(torch.linalg.matrix_norm(blocks.mT @ blocks - eye).amax()) <= settings.threshold:
            return
        error = float(rotation_error(blocks))
        if error <= settings.threshold:
            return
        norm = float(skew_norm(skew.detach()))
    message = _advice(layer, adapter_name, terms, norm, error)
    if settings.mode == "raise":
        raise OrthogonalityError(message)
    _warned.add(layer)
    warnings.warn(message, OrthogonalityWarning, stacklevel=2)
