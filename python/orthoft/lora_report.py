"""What an export to LoRA did per layer: the rank chosen and the error left, printable as a table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerExport:
    """One exported layer.

    ``relative_error`` is ``||delta - lora_B @ lora_A|| / ||delta||`` (Frobenius; 0 for a zero delta) with
    the factors as stored, i.e. after the cast to the export dtype. ``max_rank`` is the largest rank the
    layer can take (``groups * min(out/groups, F)`` for a convolution); ``capped`` says that the int rank
    asked for was above it, so that ``max_rank`` was used instead.
    """

    path: str
    kind: str
    shape: tuple[int, int]
    rank: int
    max_rank: int
    method: str
    relative_error: float
    capped: bool = False


@dataclass(frozen=True)
class LoraExportReport:
    """The layers of one export, in model order; ``str(report)`` is a table to choose a rank from."""

    requested_rank: int | float
    layers: tuple[LayerExport, ...]

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    @property
    def capped_layers(self) -> list[str]:
        """Layers whose full rank is below the int rank asked for (they are exact)."""
        return [layer.path for layer in self.layers if layer.capped]

    def __str__(self) -> str:
        header = ("layer", "kind", "delta shape", "rank", "max rank", "method", "relative error")
        rows = [
            (
                layer.path,
                layer.kind,
                f"{layer.shape[0]} x {layer.shape[1]}",
                f"{layer.rank}{' (capped)' if layer.capped else ''}",
                str(layer.max_rank),
                layer.method,
                f"{layer.relative_error:.3e}",
            )
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            for row in [header, *rows]
        ]
        lines.insert(1, "-+-".join("-" * width for width in widths))
        summary = f"LoRA export at rank {self.requested_rank!r}: {len(self.layers)} layers, "
        summary += f"largest relative error {self.max_relative_error:.3e}"
        if self.capped_layers:
            summary += f"; {len(self.capped_layers)} layers at their full rank (below the rank asked for)"
        return "\n".join([summary, *lines])
