"""The kinds of base layer orthoft adapts: a registry of dispatchers, first match wins.

Each ``BaseLayerKind`` says whether it matches a module, which family of orthoft layer adapts it
(``linear`` rotates the input features, ``conv2d`` the flattened filters), its sizes, how to run it
without its bias (for BOFT's output scale), and how to read and write its weight for merging. A new
kind (a quantized linear, say) is one ``register_kind`` call; nothing else needs to know about it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _plain_weight(module: nn.Module) -> torch.Tensor:
    return module.weight


def _copy_weight(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight.copy_(weight)


def _clone_weight(module: nn.Module) -> Any:
    return module.weight.detach().clone()


def _always_mergeable(module: nn.Module) -> str | None:
    return None


@dataclass(frozen=True)
class BaseLayerKind:
    """One kind of base layer.

    ``weight`` gives the weight to merge into as a dense floating tensor in the module's own layout
    (``(out, in)`` for Linear, ``(in, out)`` with ``fan_in_fan_out``, the conv layout for Conv2d);
    ``write_weight`` stores such a tensor back (requantizing where needed). ``save_weight`` and
    ``restore_weight`` keep the stored weight exactly, so that unmerging gives it back bit for bit.

    ``dtype`` and ``device`` say in which float dtype the weight computes and where it lives, so that
    adding an adapter dequantizes nothing (``None``: read from ``weight``); ``merge_blocker`` says why
    weights cannot be merged into a module (a forward-only quantized layer), or ``None`` when they can.
    """

    name: str
    family: str
    matches: Callable[[nn.Module], bool]
    # (in_features, out_features), as PEFT names them for the layer.
    features: Callable[[nn.Module], tuple[int, int]] = lambda module: (
        module.in_features,
        module.out_features,
    )
    fan_in_fan_out: bool = False
    # y = x @ W.T for the linear family, without the bias (None: not available for this kind).
    run_without_bias: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    weight: Callable[[nn.Module], torch.Tensor] = _plain_weight
    write_weight: Callable[[nn.Module, torch.Tensor], None] = _copy_weight
    save_weight: Callable[[nn.Module], Any] = _clone_weight
    restore_weight: Callable[[nn.Module, Any], None] = _copy_weight
    dtype: Callable[[nn.Module], torch.dtype] | None = None
    device: Callable[[nn.Module], torch.device] | None = None
    merge_blocker: Callable[[nn.Module], str | None] = _always_mergeable


_KINDS: list[BaseLayerKind] = []
# Kind name -> when it was registered: error messages list kinds in that order (plain layers first),
# whatever their match priority.
_REGISTERED: dict[str, int] = {}


def register_kind(kind: BaseLayerKind, *, before: str | None = None) -> None:
    """Adds ``kind`` to the registry, at the end or just before the kind named ``before``.

    Subclasses must come before their base class (a quantized ``nn.Linear`` before ``torch.nn.Linear``).
    """
    if any(existing.name == kind.name for existing in _KINDS):
        raise ValueError(f"a base-layer kind named {kind.name!r} is already registered")
    index = len(_KINDS) if before is None else next(i for i, k in enumerate(_KINDS) if k.name == before)
    _KINDS.insert(index, kind)
    _REGISTERED.setdefault(kind.name, len(_REGISTERED))


def kind_of(module: nn.Module) -> BaseLayerKind | None:
    """The first registered kind that matches ``module``, or ``None``."""
    return next((kind for kind in _KINDS if kind.matches(module)), None)


def supported_kinds(family: str | None = None) -> str:
    """The registered kinds (of one family) in the order they were registered, for error messages."""
    kinds = sorted(_KINDS, key=lambda kind: _REGISTERED.get(kind.name, len(_REGISTERED)))
    return ", ".join(kind.name for kind in kinds if family is None or kind.family == family)


def _transformers_conv1d(module: nn.Module) -> bool:
    # transformers is optional: a module of its Conv1D type implies it is loaded.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


register_kind(
    BaseLayerKind(
        name="torch.nn.Linear",
        family="linear",
        matches=lambda module: isinstance(module, nn.Linear),
        run_without_bias=lambda module, x: F.linear(x, module.weight),
    )
)
register_kind(
    BaseLayerKind(
        name="transformers' Conv1D",
        family="linear",
        matches=_transformers_conv1d,
        features=lambda module: tuple(module.weight.shape),
        fan_in_fan_out=True,
        run_without_bias=lambda module, x: x @ module.weight,
    )
)
register_kind(
    BaseLayerKind(
        name="torch.nn.Conv2d",
        family="conv2d",
        matches=lambda module: isinstance(module, nn.Conv2d),
        features=lambda module: (module.in_channels, module.out_channels),
    )
)
