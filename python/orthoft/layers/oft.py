"""OFT layers: a block-diagonal rotation of ``r`` Cayley blocks of size ``b`` (``r * b = F``)."""

from __future__ import annotations

import torch
from torch import nn

from .base import OrthoftLayer, compute_dtype
from .conv import Conv2dLayer
from .linear import LinearLayer
from .options import OFTOptions, with_options_signature
from .rotation import cayley_blocks, drop_blocks, packed_skew, project_packed_skew
from .series_check import check_series_rotation


class OFTRotation(nn.Module):
    """One OFT adapter's tensor: ``weight`` ``(r, b*(b-1)/2)``, the strict upper triangles of the
    skew blocks (``(1, ...)`` with block sharing), laid out as PEFT's ``OFTRotationModule``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class OFTLayer(OrthoftLayer):
    """The OFT method: ``R = blockdiag(R_1 .. R_r)``, each ``R_j`` the Cayley transform of a skew block."""

    adapter_parameter_names = ("oft_R",)
    options_class = OFTOptions
    oft_R: nn.ModuleDict
    adapter_options: dict[str, OFTOptions]  # type: ignore[assignment]

    def _init_adapter_containers(self) -> None:
        self.oft_R = nn.ModuleDict()

    def _create_adapter_tensors(self, adapter_name: str, options: OFTOptions, device: torch.device) -> None:
        b = options.block_size
        weight = torch.zeros(
            (1 if options.block_share else options.r) * self.num_experts,
            b * (b - 1) // 2,
            dtype=self._adapter_dtype(),
            device=device,
        )
        if not options.init_weights:
            nn.init.normal_(weight, mean=0.0, std=0.1)
        self.oft_R[adapter_name] = OFTRotation(weight)

    def _rotation_factors(self, adapter_name: str, training: bool) -> tuple[torch.Tensor, int]:
        options = self.adapter_options[adapter_name]
        weight = self.oft_R[adapter_name].weight
        if options.coft:
            # As PEFT: the parameter itself is projected before each use.
            # Each expert's blocks are projected as one layer's: the dimension PEFT counts comes first.
            with torch.no_grad():
                per_expert = weight.view(self.num_experts, -1, weight.shape[-1]).transpose(0, 1)
                projected = project_packed_skew(per_expert, options.eps).transpose(0, 1)
                weight.copy_(projected.reshape(weight.shape))
        b, experts = options.block_size, self.num_experts
        skew = packed_skew(weight.to(compute_dtype(weight.dtype)), b)
        terms = options.num_cayley_neumann_terms if options.use_cayley_neumann else 0
        blocks = cayley_blocks(skew, terms)
        if training and terms:
            check_series_rotation(self, adapter_name, skew, blocks, terms)
        # A shared block is transformed once and repeated over the r blocks (of each expert).
        rotations = blocks.view(experts, -1, b, b).expand(experts, options.r, b, b)
        rotations = rotations.reshape(1, experts * options.r, b, b)
        if training and options.dropout > 0:
            rotations = drop_blocks(rotations, options.dropout, experts)
        return rotations, b

    def _output_scale(self, adapter_name: str) -> torch.Tensor | None:
        return None

    def _rotation_chunk_size(self, adapter_name: str) -> int:
        return self.adapter_options[adapter_name].block_size


class OFTLinear(OFTLayer, LinearLayer):
    """``nn.Linear`` with an OFT adapter: ``y = base(x @ R)``, ``x @ R`` by the butterfly operator."""


class OFTConv2d(OFTLayer, Conv2dLayer):
    """``nn.Conv2d`` with an OFT adapter on its flattened filters: ``W' = W_flat @ R^T``, exact."""


# The keyword options show up typed in the signatures (help, editors), from the one declaration.
OFTLayer.add_adapter = with_options_signature(OFTLayer.add_adapter, OFTOptions)  # type: ignore[method-assign]
OFTLinear.__init__ = with_options_signature(OFTLinear.__init__, OFTOptions)  # type: ignore[method-assign]
OFTConv2d.__init__ = with_options_signature(OFTConv2d.__init__, OFTOptions)  # type: ignore[method-assign]
