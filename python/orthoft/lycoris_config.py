"""``LycorisConfig``: LyCORIS's diag-OFT and BOFT on the output features, for ``get_orthoft_model``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import _method_config
from .layers.lycoris_options import LycorisOptions
from .layers.options import Owner

__all__ = ["LycorisConfig"]

_LycorisFields = _method_config(
    "_LycorisFields",
    LycorisOptions,
    # Never valid here (``bias`` must be "none"), so that no bias is trained.
    "lycoris_only",
    "The shared config fields and one field per option of ``LycorisOptions``.",
)


@dataclass
class LycorisConfig(_LycorisFields):  # type: ignore[misc,valid-type]
    """diag-OFT or BOFT as LyCORIS and kohya's sd-scripts train them, on the output features of the targeted
    Linear, transformers Conv1D and Conv2d layers; saved as LyCORIS or kohya files
    (``orthoft.save_adapter(model, "file.safetensors", format="lycoris" | "kohya")``).

    ``algo`` is ``"diag-oft"`` or ``"boft"``; ``block_size`` the requested block size (LyCORIS's
    ``network_dim``), from which each layer's own is chosen as LyCORIS chooses it; ``constraint`` (0: none)
    limits the rotation (the skew blocks' Frobenius norm to ``constraint * out_features``); ``rescaled``
    trains a scale per output feature. ``layer_overrides`` maps a module path to options that differ there
    (as a file that LyCORIS wrote can hold several block sizes). The files carry no biases and no other
    modules: ``bias`` must stay ``"none"`` and ``modules_to_save`` empty.
    """

    layer_overrides: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.bias != "none":
            raise ValueError(
                f"{owner}: `bias` must be 'none' (LyCORIS files carry no biases), got {self.bias!r}."
            )
        if self.modules_to_save:
            raise ValueError(
                f"{owner}: `modules_to_save` must be empty (LyCORIS files carry only the adapters), "
                f"got {self.modules_to_save!r}."
            )
        if self.target_parameters:
            raise ValueError(
                f"{owner}: `target_parameters` must be empty (LyCORIS's OFT adapts layers, not raw "
                f"parameters; use OFTConfig or BOFTConfig for those), got {self.target_parameters!r}."
            )
        overrides = self.layer_overrides or {}
        if not isinstance(overrides, Mapping) or not all(
            isinstance(path, str) and isinstance(values, Mapping) for path, values in overrides.items()
        ):
            raise ValueError(
                f"{owner}: `layer_overrides` must map module paths to dicts of options, got {overrides!r}."
            )
        for path, values in overrides.items():
            reporter = Owner(f"{owner} (layer_overrides[{path!r}])", config_of=self.options_class)
            merged = {**self.layer_options(), **values}
            self.options_class.checked(reporter, merged).check_without_layer(reporter)
        self.layer_overrides = {path: dict(values) for path, values in overrides.items()} or None

    def options_for(self, path: str) -> dict[str, Any]:
        return {**self.layer_options(), **(self.layer_overrides or {}).get(path, {})}
