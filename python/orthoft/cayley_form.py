"""Converting an OFT adapter between the Cayley-Neumann series and the exact Cayley transform.

The two forms are transposes of each other (in PEFT, and in orthoft, which matches it): the exact form
computes ``(I - Q)(I + Q)^-1``, the series approximates ``(I + Q)(I - Q)^-1``. Flipping
``use_cayley_neumann`` on a trained adapter therefore inverts its rotation; ``load_adapter`` never does.
Negating ``Q`` turns one into the other: the exact form of ``-Q`` is what the series of ``Q`` approximates.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .layers.oft import OFTLayer
from .layers.options import Invalid, series_terms
from .tuner import adapter_configs, named_orthoft_layers

__all__ = ["convert_cayley_form"]


def convert_cayley_form(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    use_cayley_neumann: bool,
    num_cayley_neumann_terms: int | None = None,
) -> nn.Module:
    """Switches OFT adapter ``adapter_name`` of ``model`` (a model adapted by orthoft, or one layer) to the
    exact Cayley transform (``use_cayley_neumann=False``) or to the series, keeping its rotation: ``Q`` is
    negated and the option flipped in every layer and in the model's config (which ``save_adapter`` writes).

    The outputs stay the same up to the series' own error (at most ``||Q||^k + 2 ||Q||^(k+1) / (1 - ||Q||)``
    in the rotation, for ``k`` terms and ``||Q||_2 < 1``; see ``orthogonality_report``). An adapter already in
    the requested form is left as it is. ``num_cayley_neumann_terms`` sets the number of terms when
    converting to the series (default: the adapter's). Returns ``model``.
    """
    where = "convert_cayley_form"
    if not isinstance(use_cayley_neumann, bool):
        raise TypeError(f"{where}: use_cayley_neumann must be True or False, got {use_cayley_neumann!r}")
    terms = num_cayley_neumann_terms
    if terms is not None and isinstance(series_terms(terms), Invalid):
        raise ValueError(
            f"{where}: num_cayley_neumann_terms {series_terms(terms).requirement}, got {terms!r}"
        )
    layers = [(path or type(layer).__name__, layer) for path, layer in named_orthoft_layers(model)]
    layers = [(path, layer) for path, layer in layers if adapter_name in layer.adapter_names]
    if not layers:
        raise ValueError(f"{where}: no layer of {type(model).__name__} holds adapter {adapter_name!r}")
    not_oft = [path for path, layer in layers if not isinstance(layer, OFTLayer)]
    if not_oft:
        raise ValueError(
            f"{where}: adapter {adapter_name!r} of {not_oft} is not OFT; only OFT has the "
            "Cayley-Neumann option (BOFT always uses the exact transform)"
        )
    merged = [path for path, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"{where}: adapter {adapter_name!r} is merged in {merged}; unmerge it first")
    changes: dict[str, object] = {"use_cayley_neumann": use_cayley_neumann}
    if use_cayley_neumann and terms is not None:
        changes["num_cayley_neumann_terms"] = terms
    for _, layer in layers:
        options = layer.adapter_options[adapter_name]
        if options.use_cayley_neumann != use_cayley_neumann:
            with torch.no_grad():
                layer.oft_R[adapter_name].weight.neg_()
        layer.adapter_options[adapter_name] = dataclasses.replace(options, **changes)
    # The model's own config object (adapter_configs copies the mapping, not the configs), for save_adapter.
    config = adapter_configs(model).get(adapter_name) if "_orthoft_state" in model.__dict__ else None
    if config is not None:
        for field, value in changes.items():
            setattr(config, field, value)
    return model
