"""Small models and LyCORIS training for the LyCORIS/kohya file tests."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class SmallNet(nn.Module):
    """Biased and unbiased Linear layers and a biased Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc2 = nn.Linear(32, 16, bias=False)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        hidden = self.fc2(torch.tanh(self.fc1(x)))
        return hidden + self.conv(image).mean(dim=(2, 3))


def small_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 12), torch.randn(4, 3, 6, 6)


def tiny_unet(sdxl: bool = False) -> nn.Module:
    """A diffusers UNet2DConditionModel from a tiny SD1.5- or SDXL-shaped config (random weights)."""
    from diffusers import UNet2DConditionModel

    options: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    if sdxl:
        options.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            transformer_layers_per_block=(1, 2),
        )
    return UNet2DConditionModel(**options).eval()


def unet_call(unet: nn.Module, sdxl: bool = False) -> Callable[[nn.Module], torch.Tensor]:
    """A fixed random input for ``unet``; the returned function runs a model of its shape on it."""
    sample, timestep, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 5, 32)
    extra = {}
    if sdxl:
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}}
    return lambda model: model(sample, timestep, context, **extra).sample


def quiet_lycoris() -> None:
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def lycoris_trained(
    base: nn.Module, run: Callable[[nn.Module], torch.Tensor], steps: int = 2, **options: Any
) -> tuple[nn.Module, Any]:
    """A copy of ``base`` with a LyCORIS network (``options``: algo, constraint, rescaled, linear_dim)
    applied and trained ``steps`` Adam steps towards a random target; returns the copy and the network."""
    import lycoris

    quiet_lycoris()
    model = copy.deepcopy(base)
    network = lycoris.create_lycoris(model, 1.0, linear_alpha=1, **options)
    network.apply_to()
    parameters = network.prepare_optimizer_params(0.02)
    optimizer = torch.optim.Adam(parameters, lr=0.02)
    target = torch.randn_like(run(model))
    for _ in range(steps):
        optimizer.zero_grad()
        (run(model) - target).square().mean().backward()
        optimizer.step()
    return model, network


def train_steps(model: nn.Module, run: Callable[[nn.Module], torch.Tensor], steps: int = 2) -> None:
    """Adam steps of the trainable parameters of ``model`` towards a random target."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert parameters
    optimizer = torch.optim.Adam(parameters, lr=0.02)
    target = torch.randn_like(run(model))
    for _ in range(steps):
        optimizer.zero_grad()
        (run(model) - target).square().mean().backward()
        optimizer.step()
