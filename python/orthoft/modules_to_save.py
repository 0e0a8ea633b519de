"""``ModulesToSaveWrapper``: a module trained in full alongside the adapters, one copy per adapter."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: one trainable copy per adapter, the original kept frozen.

    The forward pass runs the active adapter's copy, or the original when adapters are disabled
    or no active adapter has a copy. Attributes not found on the wrapper are read from that module.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_enabled = True

    def add_copy(self, adapter_name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        trainable.requires_grad_(True)
        self.modules_to_save[adapter_name] = trainable

    @property
    def current_module(self) -> nn.Module:
        if self.adapters_enabled and self.active_adapter is not None:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Only once fully built (copy/pickle create instances without ``__init__``).
            if name in ("original_module", "modules_to_save") or "original_module" not in self.__dict__.get(
                "_modules", {}
            ):
                raise
            return getattr(self.current_module, name)
