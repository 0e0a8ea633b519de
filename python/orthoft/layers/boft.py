"""BOFT layers: a chain of ``m`` butterfly factors of ``D`` Cayley blocks of size ``b``, and a scale."""

from __future__ import annotations

import torch
from torch import nn

from .base import OrthoftLayer, compute_dtype
from .conv import Conv2dLayer
from .linear import LinearLayer
from .options import BOFTOptions, with_options_signature
from .rotation import block_skew, cayley_blocks, chunk_size, drop_blocks


class BOFTLayer(OrthoftLayer):
    """The BOFT method: ``R = M_{m-1} @ ... @ M_0``, ``M_i = P_i blockdiag(R_i1 .. R_iD) P_i^T``, and a
    per-output scale ``s``. Each block ``R_ij`` is the exact Cayley transform of ``(B - B^T) / 2``."""

    adapter_parameter_names = ("boft_R", "boft_s")
    options_class = BOFTOptions
    boft_R: nn.ParameterDict
    boft_s: nn.ParameterDict
    adapter_options: dict[str, BOFTOptions]  # type: ignore[assignment]

    def _init_adapter_containers(self) -> None:
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()

    def _scale_shape(self) -> tuple[int, int]:
        """PEFT's shape of ``boft_s``: ``(out, 1)`` for Linear, ``(1, out)`` for Conv2d."""
        raise NotImplementedError

    def _create_adapter_tensors(self, adapter_name: str, options: BOFTOptions, device: torch.device) -> None:
        b = options.block_size
        factory = {"dtype": self._adapter_dtype(), "device": device}
        blocks_per_factor = options.block_num * self.num_experts
        blocks = torch.zeros(options.n_butterfly_factor, blocks_per_factor, b, b, **factory)
        scale = torch.ones(self._scale_shape(), **factory)
        if not options.init_weights:
            nn.init.normal_(blocks, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(blocks)
        self.boft_s[adapter_name] = nn.Parameter(scale)

    def _rotation_factors(self, adapter_name: str, training: bool) -> tuple[torch.Tensor, int]:
        options = self.adapter_options[adapter_name]
        blocks = self.boft_R[adapter_name]
        rotations = cayley_blocks(block_skew(blocks.to(compute_dtype(blocks.dtype))), 0)
        if training and options.dropout > 0:
            rotations = drop_blocks(rotations, options.dropout, self.num_experts)
        return rotations, options.block_size

    def _output_scale(self, adapter_name: str) -> torch.Tensor | None:
        scale = self.boft_s[adapter_name]
        return scale.reshape(-1).to(compute_dtype(scale.dtype))

    def _rotation_chunk_size(self, adapter_name: str) -> int:
        options = self.adapter_options[adapter_name]
        return chunk_size(options.n_butterfly_factor, options.block_size)


class BOFTLinear(BOFTLayer, LinearLayer):
    """``nn.Linear`` with a BOFT adapter: ``y = (x @ R) @ W.T * s + bias``, ``x @ R`` by the butterfly
    operator (no dense ``in x in`` matrix)."""

    def _scale_shape(self) -> tuple[int, int]:
        return (self.out_features, 1)


class BOFTConv2d(BOFTLayer, Conv2dLayer):
    """``nn.Conv2d`` with a BOFT adapter on its flattened filters: ``W' = (W_flat @ R^T) * s``, exact."""

    def _scale_shape(self) -> tuple[int, int]:
        return (1, self.out_channels)


# The keyword options show up typed in the signatures (help, editors), from the one declaration.
BOFTLayer.add_adapter = with_options_signature(BOFTLayer.add_adapter, BOFTOptions)  # type: ignore[method-assign]
BOFTLinear.__init__ = with_options_signature(BOFTLinear.__init__, BOFTOptions)  # type: ignore[method-assign]
BOFTConv2d.__init__ = with_options_signature(BOFTConv2d.__init__, BOFTOptions)  # type: ignore[method-assign]
