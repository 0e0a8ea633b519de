"""``OrthoftLayer``: a frozen base layer plus named orthogonal adapters.

The base class keeps the adapter bookkeeping (active, merged, enabled), merging and the dense
views used for inspection. Subclasses come in two kinds that are combined by inheritance:

- the method (``OFTLayer``, ``BOFTLayer``) owns the adapter tensors and turns them into butterfly
  rotation blocks ``(m, D, b, b)`` and an optional per-output scale;
- the base layer kind (``LinearLayer``, ``Conv2dLayer``) wraps the module, says how its weight
  reads as an ``(out, F)`` matrix and runs the adapted forward.
"""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

import torch
from torch import nn

from .options import BOFTOptions, OFTOptions, layer_label
from .rotation import dense_rotation, rotate_rows_transposed

_Layer = TypeVar("_Layer", bound="OrthoftLayer")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rotations and merged weights are computed in at least float32."""
    return torch.promote_types(dtype, torch.float32)


class OrthoftLayer(nn.Module):
    """Common base of ``OFTLinear``, ``OFTConv2d``, ``BOFTLinear`` and ``BOFTConv2d``.

    Several active adapters compose in order: ``R = R_last @ ... @ R_first``, scales multiplied.
    Adapters named in ``set_adapter`` or ``merge`` that this layer does not hold are skipped, so
    that a model-wide adapter can target only some layers.

    ``merge`` keeps a copy of the unmerged base weight, and ``unmerge`` writes it back: the original
    weight returns bit for bit (a Cayley-Neumann rotation is not exactly orthogonal, and half
    precision weights would drift under repeated inversion), at the cost of one weight copy while
    merged.
    """

    # Attributes holding adapter tensors, keyed by adapter name.
    adapter_parameter_names: tuple[str, ...] = ()

    base_layer: nn.Module
    in_features: int
    out_features: int
    # F: the size of the rotation (in_features for Linear, (in/groups)*kh*kw for Conv2d).
    filter_size: int
    adapter_options: dict[str, OFTOptions | BOFTOptions]

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        adapter_name: str,
        fan_in_fan_out: bool,
        layer_name: str | None,
        options: dict[str, Any],
    ) -> None:
        super().__init__()
        self.layer_name = layer_name
        self._attach_base_layer(base_layer, fan_in_fan_out)
        base_layer.requires_grad_(False)
        self._init_adapter_containers()
        self.adapter_options = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._adapters_disabled = False
        self._unmerged_weight: torch.Tensor | None = None
        self.add_adapter(adapter_name, **options)
        self.set_adapter(adapter_name)

    @classmethod
    def from_module(
        cls: type[_Layer],
        module: nn.Module,
        *,
        adapter_name: str = "default",
        fan_in_fan_out: bool = False,
        layer_name: str | None = None,
        **options: Any,
    ) -> _Layer:
        """Wraps ``module``, sharing (not copying) its parameters, with a first adapter ``adapter_name``.

        ``options`` are the adapter options of ``add_adapter``; ``layer_name`` (the module's path in its
        model) only serves error messages.
        """
        layer = cls.__new__(cls)
        OrthoftLayer.__init__(
            layer,
            module,
            adapter_name=adapter_name,
            fan_in_fan_out=fan_in_fan_out,
            layer_name=layer_name,
            options=options,
        )
        return layer

    # Hooks of the method (OFT, BOFT).
    def _init_adapter_containers(self) -> None:
        raise NotImplementedError

    def add_adapter(self, adapter_name: str, **options: Any) -> None:
        """Adds a named adapter with its own options; ``active_adapters`` is unchanged."""
        raise NotImplementedError

    def _rotation_factors(self, adapter_name: str, training: bool) -> tuple[torch.Tensor, int]:
        """The adapter's rotation blocks ``(m, D, b, b)`` in ``compute_dtype`` and the block size ``b``."""
        raise NotImplementedError

    def _output_scale(self, adapter_name: str) -> torch.Tensor | None:
        """The adapter's per-output scale ``(out,)``, or ``None`` when it has none."""
        raise NotImplementedError

    # Hooks of the base layer kind (Linear, Conv2d).
    def _attach_base_layer(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        """Checks and stores ``base_layer``; sets ``in_features``, ``out_features`` and ``filter_size``."""
        raise NotImplementedError

    def _filter_text(self) -> str:
        """What the rotation size F is, for error messages."""
        raise NotImplementedError

    def _dims_repr(self) -> str:
        raise NotImplementedError

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as an ``(out, F)`` matrix."""
        raise NotImplementedError

    def _weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """An ``(out, F)`` matrix in the base weight's layout."""
        raise NotImplementedError

    def _adapted_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        raise NotImplementedError

    # Adapter bookkeeping.
    @property
    def label(self) -> str:
        """The layer as error messages name it."""
        return layer_label(type(self).__name__, self.layer_name)

    @property
    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, in the order they were added."""
        return list(self.adapter_options)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._adapters_disabled

    def _check_new_adapter_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(
                f"{self.label}: adapter names are non-empty strings without '.', got {adapter_name!r}"
            )
        if adapter_name in self.adapter_options:
            raise ValueError(f"{self.label}: adapter {adapter_name!r} already exists; delete it first")

    def _check_known_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapter_options:
            raise ValueError(
                f"{self.label}: no adapter named {adapter_name!r}; adapters: {self.adapter_names}"
            )

    def _held(self, adapter_names: list[str]) -> list[str]:
        return [name for name in adapter_names if name in self.adapter_options]

    def _set_trainable(self, adapter_name: str, trainable: bool) -> None:
        for attribute in self.adapter_parameter_names:
            getattr(self, attribute)[adapter_name].requires_grad_(trainable)

    def _adapter_dtype(self) -> torch.dtype:
        """Adapter tensors are float32 (float64 for a float64 base layer)."""
        return compute_dtype(self.base_layer.weight.dtype)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Makes ``adapter_names`` the active adapters: trainable, and applied in forward in order."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names:
            self._set_trainable(name, name in names)
        self.active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Turns the adapters on or off; off freezes them and forward runs the (unmerged) base layer."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for name in self.adapter_names:
                self._set_trainable(name, False)
        self._adapters_disabled = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter; if it was active, the remaining active ones (or the first left) take over."""
        self._check_known_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"{self.label}: adapter {adapter_name!r} is merged into the base weight; unmerge() first"
            )
        for attribute in self.adapter_parameter_names:
            del getattr(self, attribute)[adapter_name]
        del self.adapter_options[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = [name for name in self.active_adapters if name != adapter_name]
            if not remaining and self.adapter_names:
                remaining = [sorted(self.adapter_names)[0]]
                warnings.warn(
                    f"{self.label}: the deleted adapter {adapter_name!r} was the active one; "
                    f"{remaining[0]!r} is active now",
                    stacklevel=2,
                )
            self.set_adapter(remaining)

    # Dense views and merging.
    def _apply_adapter(self, matrix: torch.Tensor, adapter_name: str, training: bool) -> torch.Tensor:
        """``(matrix @ R^T) * s`` for an ``(out, F)`` weight matrix."""
        rotations, block_size = self._rotation_factors(adapter_name, training)
        rotated = rotate_rows_transposed(matrix, rotations.to(matrix.dtype), block_size)
        scale = self._output_scale(adapter_name)
        return rotated if scale is None else rotated * scale.to(matrix.dtype)[:, None]

    def _adapted_weight_matrix(
        self, weight: torch.Tensor, adapter_names: list[str], training: bool
    ) -> torch.Tensor:
        """The ``(out, F)`` weight with ``adapter_names`` applied in order, in ``compute_dtype``."""
        matrix = self._weight_matrix(weight).to(compute_dtype(weight.dtype))
        for name in adapter_names:
            matrix = self._apply_adapter(matrix, name, training)
        return matrix

    def _selected(self, adapter_name: str | None) -> list[str]:
        if adapter_name is None:
            return self._held(self.active_adapters)
        self._check_known_adapter(adapter_name)
        return [adapter_name]

    def get_rotation(self, adapter_name: str | None = None) -> torch.Tensor:
        """The dense ``F x F`` rotation ``R`` of one adapter (default: the active ones composed).

        Built densely for merging and inspection only; forward never forms it for Linear layers.
        """
        rotation: torch.Tensor | None = None
        for name in self._selected(adapter_name):
            rotations, block_size = self._rotation_factors(name, training=False)
            dense = dense_rotation(rotations, block_size)
            rotation = dense if rotation is None else dense @ rotation.to(dense.dtype)
        if rotation is None:
            weight = self.base_layer.weight
            return torch.eye(self.filter_size, dtype=compute_dtype(weight.dtype), device=weight.device)
        return rotation

    def _original_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight.detach()
        return weight if self._unmerged_weight is None else self._unmerged_weight.to(weight.device)

    def get_delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """Merged weight minus base weight for one adapter (default: the active ones composed).

        In the base weight's layout and dtype, relative to the unmerged weight even while merged.
        """
        original = self._original_weight()
        merged = self._adapted_weight_matrix(original, self._selected(adapter_name), training=False)
        delta = self._weight_from_matrix(merged) - original.to(merged.dtype)
        return delta.to(original.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Writes ``W' = (W @ R^T) * s`` of ``adapter_names`` (default: the active ones) into the base weight.

        Computed in float32 and cast to the weight's dtype. With ``safe_merge`` a non-finite result
        raises ``ValueError`` and leaves the layer untouched. Adapters already merged are skipped.
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"{self.label}: adapter_names must be a list of names, got {adapter_names!r}")
        names = self._held(self.active_adapters if adapter_names is None else list(adapter_names))
        already = [name for name in names if name in self.merged_adapters]
        if already:
            warnings.warn(f"{self.label}: adapters {already} are already merged; skipped", stacklevel=2)
        names = [name for name in names if name not in self.merged_adapters]
        if not names:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            matrix = self._weight_matrix(weight).to(compute_dtype(weight.dtype))
            for name in names:
                matrix = self._apply_adapter(matrix, name, training=False)
                if safe_merge and not torch.isfinite(matrix.to(weight.dtype)).all():
                    raise ValueError(
                        f"{self.label}: merging adapter {name!r} gives non-finite weights; "
                        "the layer is unchanged"
                    )
            if self._unmerged_weight is None:
                self._unmerged_weight = weight.detach().clone()
            weight.copy_(self._weight_from_matrix(matrix))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restores the base weight saved by the first ``merge``, exactly."""
        if self._unmerged_weight is None:
            warnings.warn(f"{self.label}: no adapter is merged; nothing to unmerge", stacklevel=2)
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._adapters_disabled and self.merged:
            self.unmerge()
        active = self._held(self.active_adapters)
        if self._adapters_disabled or self.merged or not active:
            return self.base_layer(x)
        weight = self.base_layer.weight
        if x.device != weight.device:
            raise ValueError(f"{self.label}: the input is on {x.device} but the layer is on {weight.device}")
        return self._adapted_forward(x, active)

    def extra_repr(self) -> str:
        adapters = "; ".join(f"{name}: {options}" for name, options in self.adapter_options.items())
        state = ", adapters disabled" if self._adapters_disabled else ""
        return (
            f"{self._dims_repr()}, active_adapters={self.active_adapters}, "
            f"merged_adapters={self.merged_adapters}{state}\nadapters: {adapters}"
        )
