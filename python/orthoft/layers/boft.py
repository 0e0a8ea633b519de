"""BOFT layers: a chain of ``m`` butterfly factors of ``D`` Cayley blocks of size ``b``, and a scale."""

from __future__ import annotations

import torch
from torch import nn

from .base import OrthoftLayer, compute_dtype
from .conv import Conv2dLayer
from .linear import LinearLayer
from .options import BOFTOptions, layer_label, resolve_boft_options
from .rotation import block_skew, cayley_blocks, drop_blocks


class BOFTLayer(OrthoftLayer):
    """The BOFT method: ``R = M_{m-1} @ ... @ M_0``, ``M_i = P_i blockdiag(R_i1 .. R_iD) P_i^T``, and a
    per-output scale ``s``. Each block ``R_ij`` is the exact Cayley transform of ``(B - B^T) / 2``."""

    adapter_parameter_names = ("boft_R", "boft_s")
    boft_R: nn.ParameterDict
    boft_s: nn.ParameterDict
    adapter_options: dict[str, BOFTOptions]  # type: ignore[assignment]

    def _init_adapter_containers(self) -> None:
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()

    def _scale_shape(self) -> tuple[int, int]:
        """PEFT's shape of ``boft_s``: ``(out, 1)`` for Linear, ``(1, out)`` for Conv2d."""
        raise NotImplementedError

    def add_adapter(
        self,
        adapter_name: str,
        *,
        block_size: int = 4,
        block_num: int = 0,
        n_butterfly_factor: int = 1,
        dropout: float = 0.0,
        init_weights: bool = True,
        layer_name: str | None = None,
    ) -> None:
        """Adds a BOFT adapter; ``active_adapters`` is unchanged. Options as PEFT's ``BOFTConfig``
        without the ``boft_`` prefix."""
        self._check_new_adapter_name(adapter_name)
        options = resolve_boft_options(
            layer_label(type(self).__name__, layer_name or self.layer_name),
            self.filter_size,
            self._filter_text(),
            block_size=block_size,
            block_num=block_num,
            n_butterfly_factor=n_butterfly_factor,
            dropout=dropout,
            init_weights=init_weights,
        )
        b = options.block_size
        factory = {"dtype": self._adapter_dtype(), "device": self.base_layer.weight.device}
        blocks = torch.zeros(options.n_butterfly_factor, options.block_num, b, b, **factory)
        scale = torch.ones(self._scale_shape(), **factory)
        if not options.init_weights:
            nn.init.normal_(blocks, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(blocks)
        self.boft_s[adapter_name] = nn.Parameter(scale)
        self.adapter_options[adapter_name] = options
        self._set_trainable(adapter_name, adapter_name in self.active_adapters and not self.disable_adapters)

    def _rotation_factors(self, adapter_name: str, training: bool) -> tuple[torch.Tensor, int]:
        options = self.adapter_options[adapter_name]
        blocks = self.boft_R[adapter_name]
        rotations = cayley_blocks(block_skew(blocks.to(compute_dtype(blocks.dtype))), 0)
        if training and options.dropout > 0:
            rotations = drop_blocks(rotations, options.dropout)
        return rotations, options.block_size

    def _output_scale(self, adapter_name: str) -> torch.Tensor | None:
        scale = self.boft_s[adapter_name]
        return scale.reshape(-1).to(compute_dtype(scale.dtype))


class BOFTLinear(BOFTLayer, LinearLayer):
    """``nn.Linear`` with a BOFT adapter: ``y = (x @ R) @ W.T * s + bias``, ``x @ R`` by the butterfly
    operator (no dense ``in x in`` matrix)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        block_size: int = 4,
        block_num: int = 0,
        n_butterfly_factor: int = 1,
        dropout: float = 0.0,
        init_weights: bool = True,
        adapter_name: str = "default",
        layer_name: str | None = None,
    ) -> None:
        super().__init__(
            nn.Linear(in_features, out_features, bias, device, dtype),
            adapter_name=adapter_name,
            fan_in_fan_out=False,
            layer_name=layer_name,
            options={
                "block_size": block_size,
                "block_num": block_num,
                "n_butterfly_factor": n_butterfly_factor,
                "dropout": dropout,
                "init_weights": init_weights,
            },
        )

    def _scale_shape(self) -> tuple[int, int]:
        return (self.out_features, 1)


class BOFTConv2d(BOFTLayer, Conv2dLayer):
    """``nn.Conv2d`` with a BOFT adapter on its flattened filters: ``W' = (W_flat @ R^T) * s``, exact."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        block_size: int = 4,
        block_num: int = 0,
        n_butterfly_factor: int = 1,
        dropout: float = 0.0,
        init_weights: bool = True,
        adapter_name: str = "default",
        layer_name: str | None = None,
    ) -> None:
        base_layer = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        super().__init__(
            base_layer,
            adapter_name=adapter_name,
            fan_in_fan_out=False,
            layer_name=layer_name,
            options={
                "block_size": block_size,
                "block_num": block_num,
                "n_butterfly_factor": n_butterfly_factor,
                "dropout": dropout,
                "init_weights": init_weights,
            },
        )

    def _scale_shape(self) -> tuple[int, int]:
        return (1, self.out_channels)
