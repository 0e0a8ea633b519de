"""Adapters on ``nn.Embedding``: the rotation acts on the embedding outputs, ``y = E[ids] @ R``.

As PEFT's OFT ``Embedding``: the rotated dimension is ``embedding_dim`` (``in_features``; PEFT's
``out_features`` is ``num_embeddings``), the OFT tensor is ``oft_embedding_R.weight``, and merging
gives ``E' = E @ R``. PEFT has no BOFT Embedding; ``BOFTEmbedding`` follows BOFT's Linear layer with
``boft_R`` and a per-feature scale ``boft_s`` of shape ``(1, embedding_dim)``: ``y = (E[ids] @ R) * s``.

Several active adapters act on the outputs one after the other, in the order given (PEFT's order for
this layer): ``y = E[ids] @ R_first (* s_first) @ ... @ R_last (* s_last)``, which is what merging them
one after the other gives; ``get_rotation()`` composes the rotations in that order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import ops
from .base import OrthoftLayer
from .boft import BOFTLayer
from .kinds import BaseLayerKind, register_kind
from .oft import OFTLayer
from .options import BOFTOptions, OFTOptions, with_options_signature
from .rotation import dense_rotation

register_kind(
    BaseLayerKind(
        name="torch.nn.Embedding",
        family="embedding",
        # Quantized embeddings (bitsandbytes' Embedding4bit, ...) subclass nn.Embedding: not these.
        matches=lambda module: isinstance(module, nn.Embedding) and type(module.weight) is nn.Parameter,
        features=lambda module: (module.embedding_dim, module.num_embeddings),
    )
)


class EmbeddingLayer(OrthoftLayer):
    """The embedding family of ``OrthoftLayer``: ``y = E[ids] @ R`` (times ``s`` for BOFT)."""

    family = "embedding"

    fan_in_fan_out_error = "applies to Conv1D layers only, not nn.Embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        adapter_name: str = "default",
        layer_name: str | None = None,
        **options: Any,
    ) -> None:
        """As ``nn.Embedding``, with a first adapter ``adapter_name`` of the method's keyword ``options``."""
        super().__init__(
            nn.Embedding(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype),
            adapter_name=adapter_name,
            fan_in_fan_out=False,
            layer_name=layer_name,
            options=options,
        )

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def _filter_text(self) -> str:
        return f"embedding_dim={self.in_features}"

    def _dims_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix

    def _apply_adapter(self, matrix: torch.Tensor, adapter_name: str, training: bool) -> torch.Tensor:
        # Rows of the table are outputs: they rotate as the outputs do, E @ R (not W @ R^T).
        rotations, block_size = self._rotation_factors(adapter_name, training)
        rotated = ops.butterfly(matrix, rotations.to(matrix.dtype), block_size)
        scale = self._output_scale(adapter_name)
        return rotated if scale is None else rotated * scale.to(matrix.dtype)

    def get_rotation(self, adapter_name: str | None = None) -> torch.Tensor:
        """The dense rotation ``R`` of one adapter, or of the active ones composed in their order."""
        rotation: torch.Tensor | None = None
        for name in self._selected(adapter_name):
            rotations, block_size = self._rotation_factors(name, training=False)
            dense = dense_rotation(rotations, block_size)
            rotation = dense if rotation is None else rotation.to(dense.dtype) @ dense
        if rotation is None:
            return torch.eye(self.filter_size, dtype=self._adapter_dtype(), device=self._base_device())
        return rotation

    def _adapted_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        out = self.base_layer(x)
        for name in adapter_names:
            out = self._apply_adapter(out, name, self.training)
        return out


class OFTEmbedding(OFTLayer, EmbeddingLayer):
    """``nn.Embedding`` with an OFT adapter on its outputs; the tensor is PEFT's ``oft_embedding_R``."""

    adapter_parameter_names = ("oft_embedding_R",)
    oft_embedding_R: nn.ModuleDict

    def _init_adapter_containers(self) -> None:
        self.oft_embedding_R = nn.ModuleDict()

    @property
    def oft_R(self) -> nn.ModuleDict:  # type: ignore[override]
        """The OFT method's name for the container (PEFT saves it as ``oft_embedding_R``)."""
        return self.oft_embedding_R


class BOFTEmbedding(BOFTLayer, EmbeddingLayer):
    """``nn.Embedding`` with a BOFT adapter on its outputs: ``y = (E[ids] @ R) * s``."""

    def _scale_shape(self) -> tuple[int, int]:
        return (1, self.embedding_dim)


OFTEmbedding.__init__ = with_options_signature(OFTEmbedding.__init__, OFTOptions)  # type: ignore[method-assign]
BOFTEmbedding.__init__ = with_options_signature(BOFTEmbedding.__init__, BOFTOptions)  # type: ignore[method-assign]
