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
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from .kinds import BaseLayerKind, kind_of, supported_kinds
from .options import AdapterOptions, Owner, layer_label
from .rotation import dense_rotation, rotate_rows_transposed

_Layer = TypeVar("_Layer", bound="OrthoftLayer")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rotations and merged weights are computed in at least float32."""
    return torch.promote_types(dtype, torch.float32)


def check_adapter_name(owner: str, adapter_name: object) -> None:
    """Adapter names key module attributes and state-dict entries: non-empty, without '.'."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"{owner}: adapter_name must be a non-empty string without '.', got {adapter_name!r}"
        )


def _listed(keys: set[str]) -> str:
    ordered = sorted(keys)
    return ", ".join(ordered[:20]) + (f", ... ({len(ordered)} in all)" if len(ordered) > 20 else "")


def check_tensors_fit(owner: str, targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """A ``ValueError`` naming the missing and unexpected keys of ``tensors``, or a misshapen one."""
    missing, unexpected = set(targets) - set(tensors), set(tensors) - set(targets)
    if missing or unexpected:
        raise ValueError(
            f"{owner} do not fit: missing keys [{_listed(missing)}], unexpected keys [{_listed(unexpected)}]."
        )
    for key, target in targets.items():
        if tensors[key].shape != target.shape:
            raise ValueError(
                f"{owner}: {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(target.shape)}."
            )


def active_after_deletion(owner: str, active: list[str], deleted: str, remaining: list[str]) -> list[str]:
    """The active adapters once ``deleted`` is gone: the other active ones, or else the first added of
    ``remaining`` (in the order they were added), with a warning."""
    kept = [name for name in active if name != deleted]
    if kept or not remaining or deleted not in active:
        return kept
    warnings.warn(
        f"{owner}: the deleted adapter {deleted!r} was the active one; {remaining[0]!r} is active now",
        stacklevel=3,
    )
    return remaining[:1]


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
    # The method's options declaration and the family of base layers (see ``kinds``) the class adapts.
    options_class: type[AdapterOptions]
    family: str

    base_layer: nn.Module
    base_kind: BaseLayerKind
    fan_in_fan_out: bool
    in_features: int
    out_features: int
    # F: the size of the rotation (in_features for Linear, (in/groups)*kh*kw for Conv2d).
    filter_size: int
    # Independent rotations held side by side: one per expert of a fused MoE weight, 1 for a layer.
    num_experts: int = 1
    adapter_options: dict[str, AdapterOptions]

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
        self._unmerged_weight: Any = None
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
        # In the mode of the module it stands in for: an adapter added to a model in eval mode must not
        # train (dropout, the series check) until the model is put back into training.
        return layer.train(module.training)

    # Hooks of the method (OFT, BOFT).
    def _init_adapter_containers(self) -> None:
        raise NotImplementedError

    def _create_adapter_tensors(self, adapter_name: str, options: Any, device: torch.device) -> None:
        """Creates the tensors of a new adapter with resolved ``options`` on ``device``."""
        raise NotImplementedError

    def _rotation_factors(self, adapter_name: str, training: bool) -> tuple[torch.Tensor, int]:
        """The adapter's rotation blocks ``(m, D, b, b)`` in ``compute_dtype`` and the block size ``b``."""
        raise NotImplementedError

    def _output_scale(self, adapter_name: str) -> torch.Tensor | None:
        """The adapter's per-output scale ``(out,)``, or ``None`` when it has none."""
        raise NotImplementedError

    def _rotation_chunk_size(self, adapter_name: str) -> int:
        """``C``: the adapter's ``R`` is block diagonal in dense ``C x C`` chunks (``rotation_chunks``)."""
        raise NotImplementedError

    # Hooks of the base layer family (linear, conv2d, embedding).
    # What fan_in_fan_out=True is, for the error when a base layer does not store its weight as (in, out).
    fan_in_fan_out_error = "applies to Conv1D layers only"

    def _attach_base_layer(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        """Checks that the registry has ``base_layer`` in this class's family, stores it and its sizes."""
        kind = kind_of(base_layer)
        if kind is None or kind.family != self.family:
            raise TypeError(
                f"{self.label} cannot wrap a {type(base_layer).__module__}.{type(base_layer).__qualname__}; "
                f"supported base layers: {supported_kinds(self.family)}"
            )
        if fan_in_fan_out and not kind.fan_in_fan_out:
            raise ValueError(
                f"{self.label}: fan_in_fan_out=True {self.fan_in_fan_out_error.format(kind=kind)}"
            )
        self.base_layer = base_layer
        self.base_kind = kind
        self.fan_in_fan_out = kind.fan_in_fan_out
        self.in_features, self.out_features = kind.features(base_layer)
        self.filter_size = self._rotation_size()

    def _rotation_size(self) -> int:
        """F, the size of the rotation: ``in_features`` unless the family says otherwise."""
        return self.in_features

    def _filter_text(self) -> str:
        """What the rotation size F is, for error messages."""
        raise NotImplementedError

    def _dims_repr(self) -> str:
        raise NotImplementedError

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight (as ``base_kind.weight`` gives it) as an ``(out, F)`` matrix."""
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

    def get_base_layer(self) -> nn.Module:
        """The innermost base layer (as PEFT's tuner layers give it)."""
        base = self.base_layer
        while hasattr(base, "base_layer"):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, so that code written for the base layer reads it as before."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _check_known_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapter_options:
            raise ValueError(
                f"{self.label}: no adapter named {adapter_name!r}; adapters: {self.adapter_names}"
            )

    def _held(self, adapter_names: list[str]) -> list[str]:
        return [name for name in adapter_names if name in self.adapter_options]

    def _named_adapter_parameters(self, adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """One adapter's parameters, keyed relative to this layer without the adapter name."""
        for attribute in self.adapter_parameter_names:
            entry = getattr(self, attribute)[adapter_name]
            if isinstance(entry, nn.Parameter):
                yield attribute, entry
            else:
                for key, parameter in entry.named_parameters():
                    yield f"{attribute}.{key}", parameter

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [parameter for _, parameter in self._named_adapter_parameters(adapter_name)]

    def _update_trainable(self) -> None:
        """The one place that sets which adapter tensors train: the active ones, unless disabled."""
        for name in self.adapter_names:
            trainable = name in self.active_adapters and not self._adapters_disabled
            for parameter in self._adapter_parameters(name):
                parameter.requires_grad_(trainable)

    def _base_weight(self) -> torch.Tensor:
        """The base weight as a dense floating tensor in the base layer's layout (dequantized)."""
        return self.base_kind.weight(self.base_layer)

    def _base_device(self) -> torch.device:
        """Where the base layer's weight lives (read without dequantizing it where the kind says how)."""
        kind = self.base_kind
        return kind.device(self.base_layer) if kind.device is not None else self._base_weight().device

    def _adapter_dtype(self) -> torch.dtype:
        """Adapter tensors are float32 (float64 for a float64 base layer)."""
        kind = self.base_kind
        dtype = kind.dtype(self.base_layer) if kind.dtype is not None else self._base_weight().dtype
        return compute_dtype(dtype)

    def check_mergeable(self) -> None:
        """Raises ``TypeError`` if weights cannot be merged into the base layer (forward-only kinds)."""
        reason = self.base_kind.merge_blocker(self.base_layer)
        if reason is not None:
            raise TypeError(f"{self.label}: cannot merge into a {self.base_kind.name} layer: {reason}")

    def add_adapter(
        self,
        adapter_name: str,
        *,
        layer_name: str | None = None,
        low_cpu_mem_usage: bool = False,
        **options: Any,
    ) -> None:
        """Adds a named adapter with its own options; ``active_adapters`` is unchanged.

        ``options`` are the method's options (see ``options_class``; PEFT's config fields without the
        ``oft_``/``boft_`` prefix); ``layer_name`` overrides the module path that errors show. With
        ``low_cpu_mem_usage`` the tensors stay on the meta device until ``load_adapter_state_dict``.
        """
        label = layer_label(type(self).__name__, layer_name or self.layer_name)
        check_adapter_name(label, adapter_name)
        if adapter_name in self.adapter_options:
            raise ValueError(f"{label}: adapter {adapter_name!r} already exists; delete it first")
        checked = self.options_class.checked(Owner(label), options)
        resolved = checked.resolve(label, self.filter_size, self._filter_text())
        device = torch.device("meta") if low_cpu_mem_usage else self._base_device()
        self._create_adapter_tensors(adapter_name, resolved, device)
        self.adapter_options[adapter_name] = resolved
        self._update_trainable()

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Makes ``adapter_names`` the active adapters: trainable, and applied in forward in order."""
        self.active_adapters = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._update_trainable()

    def enable_adapters(self, enabled: bool) -> None:
        """Turns the adapters on or off; off freezes them and forward runs the (unmerged) base layer."""
        self._adapters_disabled = not enabled
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter. If it was active, the other active ones stay active, or else the first
        added of the remaining adapters becomes active (with a warning)."""
        self._check_known_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"{self.label}: adapter {adapter_name!r} is merged into the base weight; unmerge() first"
            )
        for attribute in self.adapter_parameter_names:
            del getattr(self, attribute)[adapter_name]
        del self.adapter_options[adapter_name]
        self.set_adapter(
            active_after_deletion(self.label, self.active_adapters, adapter_name, self.adapter_names)
        )

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The live tensors of one adapter, keyed as PEFT saves them relative to this layer without the
        adapter name (``oft_R.weight``; ``boft_R``, ``boft_s``)."""
        self._check_known_adapter(adapter_name)
        return dict(self._named_adapter_parameters(adapter_name))

    def load_adapter_state_dict(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copies ``tensors`` (keyed as ``adapter_state_dict`` gives them) into the adapter, strictly:
        a missing, unexpected or misshapen key is a ``ValueError`` and changes nothing."""
        targets = self.adapter_state_dict(adapter_name)
        check_tensors_fit(f"{self.label}: tensors of adapter {adapter_name!r}", targets, tensors)
        device = self._base_device()
        with torch.no_grad():
            for key, target in targets.items():
                if target.is_meta:  # created with low_cpu_mem_usage: the loaded tensor takes its place
                    self._replace_parameter(adapter_name, key, tensors[key].to(device, target.dtype))
                else:
                    target.copy_(tensors[key])
        self._update_trainable()

    def _replace_parameter(self, adapter_name: str, key: str, value: torch.Tensor) -> None:
        attribute, _, name = key.partition(".")
        container = getattr(self, attribute)
        if name:
            setattr(container[adapter_name], name, nn.Parameter(value))
        else:
            container[adapter_name] = nn.Parameter(value)

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
            return torch.eye(self.filter_size, dtype=self._adapter_dtype(), device=self._base_device())
        return rotation

    def get_delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """Merged weight minus base weight for one adapter (default: the active ones composed).

        In the base weight's layout and dtype, relative to the unmerged weight even while merged.
        """
        self.check_mergeable()
        with torch.no_grad():
            original = self._unmerged_base_weight()
        merged = self._adapted_weight_matrix(original, self._selected(adapter_name), training=False)
        delta = self._weight_from_matrix(merged) - original.to(merged.dtype)
        return delta.to(original.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Writes ``W' = (W @ R^T) * s`` of ``adapter_names`` (default: the active ones) into the base weight.

        Computed in float32 and cast to the weight's dtype. With ``safe_merge`` a non-finite result
        raises ``ValueError`` and leaves the layer untouched. Adapters already merged are skipped. A
        quantized weight is dequantized, rotated and requantized with the layer's own settings
        (``unmerge`` still gives back the original storage exactly).
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
        self.check_mergeable()
        kind, base = self.base_kind, self.base_layer
        with torch.no_grad():
            weight = kind.weight(base)
            matrix = self._weight_matrix(weight).to(compute_dtype(weight.dtype))
            for name in names:
                matrix = self._apply_adapter(matrix, name, training=False)
                if safe_merge and not torch.isfinite(matrix.to(weight.dtype)).all():
                    raise ValueError(
                        f"{self.label}: merging adapter {name!r} gives non-finite weights; "
                        "the layer is unchanged"
                    )
            if self._unmerged_weight is None:
                self._unmerged_weight = kind.save_weight(base)
            kind.write_weight(base, self._weight_from_matrix(matrix).to(weight.dtype))
        self.merged_adapters.extend(names)

    def _unmerged_base_weight(self) -> torch.Tensor:
        """The base weight as ``base_kind.weight`` gives it, before any merge."""
        if self._unmerged_weight is None:
            return self._base_weight().detach()
        merged = self.base_kind.save_weight(self.base_layer)
        self.base_kind.restore_weight(self.base_layer, self._unmerged_weight)
        original = self._base_weight().detach().clone()
        self.base_kind.restore_weight(self.base_layer, merged)
        return original

    def unmerge(self) -> None:
        """Restores the base weight saved by the first ``merge``, exactly."""
        if self._unmerged_weight is None:
            warnings.warn(f"{self.label}: no adapter is merged; nothing to unmerge", stacklevel=2)
            return
        with torch.no_grad():
            self.base_kind.restore_weight(self.base_layer, self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._adapters_disabled and self.merged:
            self.unmerge()
        active = self._held(self.active_adapters)
        if self._adapters_disabled or self.merged or not active:
            return self.base_layer(x)
        # The adapters live where the base layer does; reading them costs nothing (no dequantization).
        device = self._adapter_parameters(active[0])[0].device
        if device.type == "meta":
            raise ValueError(
                f"{self.label}: adapter {active[0]!r} was created with low_cpu_mem_usage=True and holds no "
                "values yet; load them first (orthoft.load_adapter or load_adapter_state_dict)"
            )
        if x.device != device:
            raise ValueError(f"{self.label}: the input is on {x.device} but the layer is on {device}")
        return self._adapted_forward(x, active)

    def extra_repr(self) -> str:
        adapters = "; ".join(f"{name}: {options}" for name, options in self.adapter_options.items())
        state = ", adapters disabled" if self._adapters_disabled else ""
        return (
            f"{self._dims_repr()}, active_adapters={self.active_adapters}, "
            f"merged_adapters={self.merged_adapters}{state}\nadapters: {adapters}"
        )
