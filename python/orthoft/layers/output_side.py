"""LyCORIS's diag-OFT and BOFT: rotations of a layer's output features, trained on its output activations.

``y = ((x @ W^T) @ A^T) * rescale + bias``, i.e. the merged weight ``W' = (A @ W) * rescale`` with the
bias untouched (LyCORIS's weight mode, and what every loader of its files computes), where ``A`` is
built from the stored ``oft_blocks`` (see ``output_rotation``). The frozen layer runs as it is, without
its bias; the rotation then acts on its output: the butterfly operator on the last dimension of a
linear layer's output, the ``channel_blocks`` operator on the channels of an NCHW convolution's output.
Several adapters apply in the order they were added: ``W' = A_2 (A_1 W)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .base import OrthoftLayer, compute_dtype
from .conv import Conv2dLayer
from .linear import LinearLayer
from .lycoris_options import LycorisOptions
from .options import with_options_signature
from .output_rotation import boft_factors, diag_oft_factors, times_transposed
from .output_scale import scale_output
from .rotation import _chunks_are_cheaper, rotation_chunks

__all__ = ["LycorisAdapter", "LycorisConv2d", "LycorisLayer", "LycorisLinear"]


class LycorisAdapter(nn.Module):
    """One adapter's tensors under LyCORIS's names: ``oft_blocks`` (``(D, b, b)`` for diag-OFT,
    ``(m, D, b, b)`` for BOFT) and, when rescaled, ``rescale`` ``(out, 1, ...)`` shaped like the weight."""

    rescale: nn.Parameter | None

    def __init__(self, oft_blocks: torch.Tensor, rescale: torch.Tensor | None) -> None:
        super().__init__()
        self.oft_blocks = nn.Parameter(oft_blocks)
        self.rescale = None if rescale is None else nn.Parameter(rescale)


def _channel_blocks(y: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``y`` ``(N, C, P)``: each position's channels (a row) times ``blockdiag(blocks)``."""
    _checks.channel_blocks(_checks.raise_error, y, blocks)
    return torch.ops.orthoft.channel_blocks.default(y, blocks)


class LycorisLayer(OrthoftLayer):
    """The output-side method of LyCORIS (diag-OFT or BOFT, per adapter): ``W' = (A @ W) * rescale``."""

    adapter_parameter_names = ("lycoris",)
    options_class = LycorisOptions
    lycoris: nn.ModuleDict
    adapter_options: dict[str, LycorisOptions]  # type: ignore[assignment]

    def _init_adapter_containers(self) -> None:
        self.lycoris = nn.ModuleDict()

    def _rotation_size(self) -> int:
        return self.out_features

    def _filter_text(self) -> str:
        return f"out_features={self.out_features}"

    def _create_adapter_tensors(
        self, adapter_name: str, options: LycorisOptions, device: torch.device
    ) -> None:
        b = options.block_size
        count = self.out_features // b
        shape = (count, b, b) if options.algo == "diag-oft" else (count.bit_length(), count, b, b)
        factory = {"dtype": self._adapter_dtype(), "device": device}
        blocks = torch.zeros(shape, **factory)
        rescale = None
        if options.rescaled:
            rescale = torch.ones(self.out_features, *[1] * (self.base_layer.weight.dim() - 1), **factory)
        if not options.init_weights:
            nn.init.normal_(blocks, mean=0.0, std=0.1)
            if rescale is not None:
                nn.init.normal_(rescale, mean=1.0, std=0.1)
        self.lycoris[adapter_name] = LycorisAdapter(blocks, rescale)

    def _rotation_factors(self, adapter_name: str, training: bool) -> tuple[torch.Tensor, int]:
        """The butterfly factors ``(m, D, b, b)`` of ``A`` and ``b``."""
        options = self.adapter_options[adapter_name]
        blocks = self.lycoris[adapter_name].oft_blocks
        blocks = blocks.to(compute_dtype(blocks.dtype))
        constraint = options.constraint * self.out_features
        build = diag_oft_factors if options.algo == "diag-oft" else boft_factors
        return build(blocks, constraint), options.block_size

    def _output_scale(self, adapter_name: str) -> torch.Tensor | None:
        rescale = self.lycoris[adapter_name].rescale
        return None if rescale is None else rescale.reshape(-1).to(compute_dtype(rescale.dtype))

    def _rotation_chunk_size(self, adapter_name: str) -> int:
        options = self.adapter_options[adapter_name]
        return self.out_features if options.algo == "boft" else options.block_size

    def _apply_adapter(self, matrix: torch.Tensor, adapter_name: str, training: bool) -> torch.Tensor:
        """``(A @ matrix) * rescale`` for an ``(out, F)`` weight matrix."""
        factors, block_size = self._rotation_factors(adapter_name, training)
        rotated = times_transposed(matrix.mT, factors.to(matrix.dtype), block_size).mT
        scale = self._output_scale(adapter_name)
        return rotated if scale is None else rotated * scale.to(matrix.dtype)[:, None]

    def get_rotation(self, adapter_name: str | None = None) -> torch.Tensor:
        """The dense ``out x out`` matrix ``A`` (merged weight ``A @ W``) of one adapter (default: the active
        ones composed). For inspection and tests; forward never forms it."""
        rotation: torch.Tensor | None = None
        for name in self._selected(adapter_name):
            factors, block_size = self._rotation_factors(name, training=False)
            eye = torch.eye(self.out_features, dtype=factors.dtype, device=factors.device)
            dense = times_transposed(eye, factors, block_size).mT
            rotation = dense if rotation is None else dense @ rotation.to(dense.dtype)
        if rotation is None:
            return torch.eye(self.out_features, dtype=self._adapter_dtype(), device=self._base_device())
        return rotation

    # Hooks of the base layer family.
    def _output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rotate_outputs(self, y: torch.Tensor, factors: torch.Tensor, block_size: int) -> torch.Tensor:
        """``y @ A^T`` on the output features of ``y``."""
        raise NotImplementedError

    def _times_scale(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``y * scale`` on the output features."""
        raise NotImplementedError

    def _finish(self, y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """``y * scale + bias`` on the output features."""
        raise NotImplementedError

    def _adapted_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        y = self._output_without_bias(x)
        scale: torch.Tensor | None = None
        for name in adapter_names:
            if scale is not None:  # an earlier adapter's rescale comes before this one's rotation
                y = self._times_scale(y, scale)
            factors, block_size = self._rotation_factors(name, self.training)
            y = self._rotate_outputs(y, factors.to(y.dtype), block_size)
            scale = self._output_scale(name)
            scale = None if scale is None else scale.to(y.dtype)
        return self._finish(y, scale)


class LycorisLinear(LycorisLayer, LinearLayer):
    """``nn.Linear`` (or transformers ``Conv1D``) with LyCORIS diag-OFT/BOFT on its output features:
    ``y = ((x @ W^T) @ A^T) * rescale + bias``, ``@ A^T`` by the butterfly operator."""

    def _output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        run_without_bias = self.base_kind.run_without_bias
        if run_without_bias is None:
            raise TypeError(
                f"{self.label}: an output-side adapter needs a {self.base_kind.name} without its bias"
            )
        return run_without_bias(self.base_layer, x)

    def _rotate_outputs(self, y: torch.Tensor, factors: torch.Tensor, block_size: int) -> torch.Tensor:
        return times_transposed(y, factors, block_size)

    def _times_scale(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return y * scale

    def _finish(self, y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        bias = self.base_layer.bias
        if scale is not None:
            return scale_output(y, scale, bias)
        return y if bias is None else y + bias.to(y.dtype)


class LycorisConv2d(LycorisLayer, Conv2dLayer):
    """``nn.Conv2d`` with LyCORIS diag-OFT/BOFT on its output channels: the frozen convolution without its
    bias, then ``A`` on the channels at every pixel (``channel_blocks``), ``rescale``, the bias."""

    def _dims_repr(self) -> str:
        channels = f"in_channels={self.in_channels}, out_channels={self.out_channels}"
        return f"{channels}, kernel_size={self.kernel_size}"

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.out_channels, -1)

    def _output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.base_layer.weight, None)

    def _rotate_outputs(self, y: torch.Tensor, factors: torch.Tensor, block_size: int) -> torch.Tensor:
        if y.dim() == 3:  # an unbatched input, as nn.Conv2d takes it
            return self._rotate_outputs(y.unsqueeze(0), factors, block_size).squeeze(0)
        m = factors.shape[0]
        if m == 1 or _chunks_are_cheaper(m):
            # Up to a few stages, the dense chunks C x C of A (for one factor, its blocks): y @ A^T.
            chunks = factors[0] if m == 1 else rotation_chunks(factors, block_size)
            return _channel_blocks(y.reshape(y.shape[0], y.shape[1], -1), chunks.mT).reshape(y.shape)
        # A full butterfly of many stages: on channels-last rows, without forming the dense A.
        return times_transposed(y.movedim(1, -1), factors, block_size).movedim(-1, 1)

    def _channels(self, y: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``(out,)`` shaped to broadcast over the channels of ``y``."""
        return values.reshape(-1, 1, 1)

    def _times_scale(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return y * self._channels(y, scale)

    def _finish(self, y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is not None:
            y = y * self._channels(y, scale)
        bias = self.base_layer.bias
        return y if bias is None else y + self._channels(y, bias.to(y.dtype))


# The keyword options show up typed in the signatures (help, editors), from the one declaration.
LycorisLayer.add_adapter = with_options_signature(LycorisLayer.add_adapter, LycorisOptions)  # type: ignore[method-assign]
LycorisLinear.__init__ = with_options_signature(LycorisLinear.__init__, LycorisOptions)  # type: ignore[method-assign]
LycorisConv2d.__init__ = with_options_signature(LycorisConv2d.__init__, LycorisOptions)  # type: ignore[method-assign]
