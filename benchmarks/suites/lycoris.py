"""Training step of LyCORIS's diag-OFT and BOFT: orthoft's output-side layers against LyCORIS's own modules.

Same math on both sides: LyCORIS's parameterisation (``oft_blocks``, no constraint, no rescale) on the
output features, block size and stages chosen by LyCORIS's rules. LyCORIS runs in its two modes: bypass
(the rotation on the output activations) and its default weight mode (the rotated weight each step).
Shapes: one Linear layer, and a slice of a diffusers UNet (``UNet2DConditionModel`` from a small config,
random weights) with every Linear and Conv2d adapted, as LyCORIS's network adapts them.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn

import orthoft
from cases import Case, Settings, Step, Suite
from steps import autograd_step, perturb_trainable, randn, trainable

FROZEN = "frozen (forward + backward)"
LYCORIS_MISSING = "lycoris-lora is not installed"
DIFFUSERS_MISSING = "diffusers is not installed"

# Block sizes (LyCORIS's linear_dim) per run size: (diag-OFT, BOFT).
BLOCK_SIZES = {"smoke": (8, 4), "quick": (32, 8), "full": (32, 8)}

# (channels per UNet block, latent side, batch) per run size.
UNET_SLICES = {"smoke": ((32, 64), 8, 1), "quick": ((64, 128), 16, 2), "full": ((128, 256), 16, 2)}


ALGORITHMS = {"diag-oft": "diag-OFT", "boft": "BOFT"}


def orthoft_label(algo: str, block_size: int) -> str:
    return f"orthoft {ALGORITHMS[algo]} b={block_size}"


def lycoris_label(algo: str, block_size: int, mode: str) -> str:
    """``mode``: ``"bypass"`` or ``"weight mode"``."""
    return f"LyCORIS {ALGORITHMS[algo]} b={block_size} {mode}"


def linear_shape(width: int, tokens: int) -> str:
    return f"Linear in=out={width}, {tokens} tokens"


def unet_shape(size: str) -> str:
    channels, side, batch = UNET_SLICES[size]
    return f"UNet slice channels={channels}, {side}x{side} latents, batch {batch}"


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _competitors(settings: Settings) -> list[tuple[str, dict[str, Any], str | None]]:
    diag, boft = BLOCK_SIZES[settings.size]
    lycoris_skip = None if _available("lycoris") else LYCORIS_MISSING
    out: list[tuple[str, dict[str, Any], str | None]] = [(FROZEN, {"kind": "frozen"}, None)]
    for algo, block_size in (("diag-oft", diag), ("boft", boft)):
        spec = {"algo": algo, "block_size": block_size}
        out.append((orthoft_label(algo, block_size), {**spec, "kind": "orthoft"}, None))
        out.append((lycoris_label(algo, block_size, "bypass"), {**spec, "kind": "bypass"}, lycoris_skip))
        out.append((lycoris_label(algo, block_size, "weight mode"), {**spec, "kind": "weight"}, lycoris_skip))
    return out


def _linear_sizes(settings: Settings) -> tuple[list[int], list[int]]:
    if settings.size == "smoke":
        return [64], [32]
    return list(settings.features or [1024]), list(settings.tokens or [2048])


def cases(settings: Settings) -> list[Case]:
    dtype = settings.dtype or "float32"
    out = []
    features, tokens = _linear_sizes(settings)
    for width in features:
        for count in tokens:
            shape = linear_shape(width, count)
            for competitor, spec, skip in _competitors(settings):
                spec = {**spec, "model": "linear", "features": width, "tokens": count}
                out.append(Case("lycoris", shape, competitor, FROZEN, dtype, spec, skip))
    channels, side, batch = UNET_SLICES[settings.size]
    shape = unet_shape(settings.size)
    diffusers_skip = None if _available("diffusers") else DIFFUSERS_MISSING
    for competitor, spec, skip in _competitors(settings):
        spec = {**spec, "model": "unet", "channels": list(channels), "side": side, "batch": batch}
        out.append(Case("lycoris", shape, competitor, FROZEN, dtype, spec, skip or diffusers_skip))
    return out


def _unet(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    channels = tuple(spec["channels"])
    unet = UNet2DConditionModel(
        sample_size=spec["side"],
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=channels[0],
        attention_head_dim=8,
        norm_num_groups=8,
    ).to(device)
    # diffusers warns on any dtype cast; float32 is what it is built in.
    return unet if dtype == torch.float32 else unet.to(dtype)


def _adaptable_paths(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


def _adapt(model: nn.Module, spec: dict[str, Any]) -> list[torch.Tensor]:
    """Adapts every Linear and Conv2d of ``model`` as ``spec`` says; returns the trainable tensors."""
    model.requires_grad_(False)
    kind = spec["kind"]
    if kind == "frozen":
        return []
    paths = _adaptable_paths(model)
    if kind == "orthoft":
        regex = "|".join(path.replace(".", r"\.") for path in paths)
        config = orthoft.LycorisConfig(algo=spec["algo"], block_size=spec["block_size"], target_modules=regex)
        orthoft.get_orthoft_model(model, config)
        perturb_trainable(model)
        return trainable(model)
    import lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    network = lycoris.create_lycoris(
        model,
        1.0,
        linear_dim=spec["block_size"],
        linear_alpha=1,
        algo=spec["algo"],
        bypass_mode=kind == "bypass",
    )
    network.apply_to()
    if len(network.loras) != len(paths):
        raise RuntimeError(f"LyCORIS adapted {len(network.loras)} modules, orthoft would adapt {len(paths)}")
    network.requires_grad_(True)
    perturb_trainable(network)
    # The network holds the modules; the step keeps it alive.
    parameters = trainable(network)
    model._lycoris_network = [network]  # type: ignore[attr-defined]
    return parameters


def build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype, rotate: bool) -> Step:
    if spec["model"] == "linear":
        width = spec["features"]
        # In a container, as in a network: the adapters replace the layer inside it.
        model = nn.Sequential(nn.Linear(width, width, device=device, dtype=dtype))
        parameters = _adapt(model, spec)
        x = randn((spec["tokens"], width), device, dtype, requires_grad=True)
        with torch.no_grad():
            grad = torch.randn_like(model(x))
        return autograd_step(model, [(x,)], [grad], parameters)
    unet = _unet(spec, device, dtype)
    parameters = _adapt(unet, spec)
    batch, side, context_width = spec["batch"], spec["side"], spec["channels"][0]
    sample = randn((batch, 4, side, side), device, dtype, requires_grad=True)
    context = randn((batch, 16, context_width), device, dtype)
    timestep = torch.tensor([10] * batch, device=device)

    def forward(sample: torch.Tensor) -> torch.Tensor:
        return unet(sample, timestep, context).sample

    with torch.no_grad():
        grad = torch.randn_like(forward(sample))
    return autograd_step(forward, [(sample,)], [grad], parameters)


SUITE = Suite(
    name="lycoris",
    title="lycoris: training step of LyCORIS diag-OFT and BOFT (forward, y.backward(dy), zero grads)",
    ratio_header="÷ frozen",
    cases=cases,
    build=build,
)
