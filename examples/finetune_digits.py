"""Finetune a small ViT with OFT on scikit-learn's digits, save the adapter, and load it back with PEFT.

    pip install orthoft peft transformers scikit-learn
    python examples/finetune_digits.py --out /tmp/digits

The base model stands in for a downloaded checkpoint: a ViT built from a config and trained briefly on
the digits 0-4 only, then saved with ``save_pretrained``. OFT then adapts it to all ten digits while its
weights stay frozen (only the rotations and a copy of the classifier train). The adapter is saved in
PEFT's format, so ``peft.PeftModel.from_pretrained`` (or transformers' ``model.load_adapter``) reads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import peft
import torch
from sklearn.datasets import load_digits
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

import orthoft


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images ``(n, 1, 8, 8)`` scaled to [0, 1], and their labels."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return images[train], labels[train], images[test], labels[test]


def fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (64,), generator=generator)
        optimizer.zero_grad()
        model(pixel_values=images[batch], labels=labels[batch]).loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=images).logits


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits(model, images).argmax(-1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("digits-oft"), help="where to save models")
    parser.add_argument("--steps", type=int, default=300, help="OFT training steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = digits()

    # The "pretrained" base model: knows the digits 0-4.
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    base = ViTForImageClassification(config)
    known = train_y < 5
    fit(base, train_x[known], train_y[known], steps=args.steps, lr=3e-3)
    base.save_pretrained(args.out / "base")

    model = ViTForImageClassification.from_pretrained(args.out / "base").eval()
    print(f"base model: test accuracy on all ten digits {accuracy(model, test_x, test_y):.3f}")
    oft = orthoft.OFTConfig(
        target_modules=["q_proj", "v_proj", "fc1", "fc2"], oft_block_size=8, modules_to_save=["classifier"]
    )
    model = orthoft.get_orthoft_model(model, oft)
    orthoft.print_trainable_parameters(model)
    fit(model, train_x, train_y, steps=args.steps, lr=1e-2)
    print(f"OFT-finetuned: test accuracy {accuracy(model, test_x, test_y):.3f}")
    orthoft.save_adapter(model, args.out / "adapter")

    # Anyone with PEFT loads the adapter onto the same base model.
    peft_model = peft.PeftModel.from_pretrained(
        ViTForImageClassification.from_pretrained(args.out / "base"), args.out / "adapter"
    ).eval()
    difference = (logits(peft_model, test_x) - logits(model, test_x)).abs().max().item()
    print(f"PEFT-loaded: test accuracy {accuracy(peft_model, test_x, test_y):.3f}")
    print(f"max |orthoft - PEFT| logits: {difference:.2e}")


if __name__ == "__main__":
    main()
