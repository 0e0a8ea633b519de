"""How orthogonal the rotations that the layers use are, and a check of it during training.

OFT's default, ``use_cayley_neumann=True`` (PEFT's default, 5 terms), replaces the Cayley transform by a
truncated series. It is a rotation only while ``||Q||`` (the spectral norm of the skew block) is small:
for 5 terms the singular values of ``R`` are ``1 - ||Q||^4`` at worst (``||R^T R - I||_2 = 2q^4 - q^8``),
and at ``||Q|| = 1`` ``R`` is singular. Long runs and high learning rates get there, and training
degrades without a word. Hence ``orthogonality_report(model)`` (per layer and adapter, ``||Q||_2`` and
``||R^T R - I||_2`` of the rotation blocks it uses, worst first, printable as a table) and the check
during training of ``layers.series_check``, set by ``set_orthogonality_check``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers.base import OrthoftLayer, compute_dtype
from .layers.boft import BOFTLayer
from .layers.oft import OFTLayer
from .layers.rotation import block_skew, cayley_blocks, packed_skew, project_packed_skew
from .layers.series_check import (
    CHECK_MODES,
    OrthogonalityCheck,
    OrthogonalityError,
    OrthogonalityWarning,
    orthogonality_check,
    rotation_error,
    set_orthogonality_check,
    skew_norm,
)

__all__ = [
    "CHECK_MODES",
    "OrthogonalityCheck",
    "OrthogonalityError",
    "OrthogonalityReport",
    "OrthogonalityRow",
    "OrthogonalityWarning",
    "orthogonality_check",
    "orthogonality_report",
    "set_orthogonality_check",
]


@dataclass(frozen=True)
class OrthogonalityRow:
    """One adapter of one layer: the largest ``||Q||_2`` and ``||R^T R - I||_2`` over its blocks."""

    layer: str
    adapter: str
    method: str
    form: str
    blocks: int
    q_norm: float
    error: float


def _skew_and_rotations(layer: OrthoftLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The skew blocks, the rotation blocks built from them as the layer's forward does, and the form."""
    options: Any = layer.adapter_options[name]
    if isinstance(layer, OFTLayer):
        weight = layer.oft_R[name].weight.detach()
        if options.coft:
            weight = project_packed_skew(weight, options.eps)
        skew = packed_skew(weight.to(compute_dtype(weight.dtype)), options.block_size)
        terms = options.num_cayley_neumann_terms if options.use_cayley_neumann else 0
    elif isinstance(layer, BOFTLayer):
        blocks = layer.boft_R[name].detach()
        skew, terms = block_skew(blocks.to(compute_dtype(blocks.dtype))), 0
    else:
        raise TypeError(f"{layer.label}: no orthogonality report for {type(layer).__name__}")
    form = f"series, {terms} terms" if terms else "exact"
    return skew, cayley_blocks(skew, terms), form


@dataclass(frozen=True)
class OrthogonalityReport:
    """Rows sorted worst (largest error) first; ``str()`` is a table."""

    rows: list[OrthogonalityRow]

    @property
    def worst(self) -> OrthogonalityRow | None:
        return self.rows[0] if self.rows else None

    def __str__(self) -> str:
        header = ("layer", "adapter", "method", "form", "blocks", "||Q||_2", "||R^T R - I||_2")
        lines = [
            (r.layer, r.adapter, r.method, r.form, str(r.blocks), f"{r.q_norm:.4g}", f"{r.error:.3e}")
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

        rule = "  ".join("-" * width for width in widths)
        return "\n".join([line(header), rule, *map(line, lines)]) if lines else "no orthoft adapters"


def orthogonality_report(model: nn.Module) -> OrthogonalityReport:
    """Per orthoft layer of ``model`` (a model or one layer) and adapter: the largest ``||Q||_2`` over its
    skew blocks and ``||R^T R - I||_2`` over the rotation blocks it uses (for BOFT, of each factor's blocks;
    the whole ``R`` is off by at most their sum), sorted worst first. Changes nothing."""
    rows = []
    with torch.no_grad():
        for path, layer in model.named_modules():
            if not isinstance(layer, OrthoftLayer):
                continue
            for name in layer.adapter_names:
                if any(tensor.is_meta for tensor in layer.adapter_state_dict(name).values()):
                    continue  # created with low_cpu_mem_usage and not loaded yet
                skew, rotations, form = _skew_and_rotations(layer, name)
                rows.append(
                    OrthogonalityRow(
                        layer=path or type(layer).__name__,
                        adapter=name,
                        method=layer.options_class.peft_type,
                        form=form,
                        blocks=int(skew.reshape(-1, *skew.shape[-2:]).shape[0]),
                        q_norm=float(skew_norm(skew)),
                        error=float(rotation_error(rotations)),
                    )
                )
    return OrthogonalityReport(sorted(rows, key=lambda row: row.error, reverse=True))
