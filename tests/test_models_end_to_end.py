"""Whole models adapted end to end: a small transformer, a tiny GPT-2 (Conv1D) and a small CNN.

Each is wrapped with OFT and BOFT configs, trained for a few steps, then merged, unloaded, saved
and loaded; everything runs in float64 so that merged and unmerged outputs compare tightly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from orthoft.adapter_io import load_adapter, save_adapter
from orthoft.config import BOFTConfig, OFTConfig, OrthoftConfig
from orthoft.layers import OFTLinear, OrthoftLayer
from orthoft.tuner import (
    delete_adapter,
    disable_adapters,
    get_orthoft_model,
    merge_and_unload,
    named_orthoft_layers,
    set_adapter,
    unload,
)

VOCAB, DIM, HEADS, SEQ = 37, 32, 4, 8


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(DIM, DIM)
        self.k_proj = nn.Linear(DIM, DIM)
        self.v_proj = nn.Linear(DIM, DIM)
        self.o_proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, HEADS, DIM // HEADS).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), is_causal=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, DIM))


class DecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(DIM)
        self.attn = Attention()
        self.mlp_norm = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([DecoderLayer(), DecoderLayer()])
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class SmallCNN(nn.Module):
    """Non-square, dilated and grouped kernels with several padding modes and a stride.

    Filter sizes F = (in/groups) * kh * kw: 24, 48 and 12.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=(2, 4), padding=(1, 2), padding_mode="reflect")
        self.conv2 = nn.Conv2d(
            8, 16, kernel_size=(3, 4), dilation=(2, 1), groups=2, padding=(2, 1), padding_mode="replicate"
        )
        self.conv3 = nn.Conv2d(
            16, 16, kernel_size=(1, 3), stride=2, groups=4, padding=1, padding_mode="circular"
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv1(x))
        x = F.silu(self.conv2(x))
        x = F.silu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=DIM,
        n_layer=2,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ))


def images() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, dtype=torch.float64)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "transformer": (TinyTransformer, tokens),
    "gpt2": (tiny_gpt2, tokens),
    "cnn": (SmallCNN, images),
}


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if isinstance(model, GPT2LMHeadModel) else out


ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.0", "mlp.2"]
CASES = [
    ("transformer", OFTConfig(target_modules=ATTENTION_AND_MLP, oft_block_size=8)),
    (
        "transformer",
        BOFTConfig(
            target_modules=r"layers\.\d\.(attn\.\w_proj|mlp\.[02])",
            boft_block_size=4,
            boft_n_butterfly_factor=2,
            bias="boft_only",
        ),
    ),
    (
        "gpt2",
        OFTConfig(
            target_modules="all-linear", oft_block_size=8, fan_in_fan_out=True, use_cayley_neumann=False
        ),
    ),
    (
        "gpt2",
        BOFTConfig(
            target_modules=["c_attn", "c_proj", "c_fc"],
            boft_block_size=4,
            boft_n_butterfly_factor=3,
            fan_in_fan_out=True,
        ),
    ),
    (
        "cnn",
        OFTConfig(
            target_modules=["conv1", "conv2", "conv3"],
            oft_block_size=4,
            bias="oft_only",
            modules_to_save=["head"],
        ),
    ),
    (
        "cnn",
        BOFTConfig(
            target_modules=r"conv\d", boft_block_size=2, boft_n_butterfly_factor=2, modules_to_save=["head"]
        ),
    ),
]


def plain_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize(
    ("name", "config"), CASES, ids=[f"{name}-{config.peft_type}" for name, config in CASES]
)
def test_adapt_train_merge_unload_save_load(tmp_path: Path, name: str, config: OrthoftConfig) -> None:
    build, make_input = MODELS[name]
    original = build().double().eval()
    x = make_input()
    with torch.no_grad():
        expected = run(original, x)

    model = get_orthoft_model(copy.deepcopy(original), config)
    layers = named_orthoft_layers(model)
    assert layers
    assert not any(
        isinstance(m, (nn.Embedding, nn.LayerNorm)) for _, layer in layers for m in layer.modules()
    )
    with torch.no_grad():  # adapters start at the identity
        torch.testing.assert_close(run(model, x), expected, rtol=1e-12, atol=1e-12)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn_like(expected)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.mse_loss(run(model, x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trainable

    with torch.no_grad():
        adapted = run(model, x)
        with disable_adapters(model):
            base_with_trained_biases = run(model, x)
        merged = merge_and_unload(copy.deepcopy(model))
        assert plain_types(merged) == plain_types(original)
        torch.testing.assert_close(run(merged, x), adapted, rtol=1e-9, atol=1e-10)

        unloaded = unload(copy.deepcopy(model))
        assert plain_types(unloaded) == plain_types(original)
        assert torch.equal(run(unloaded, x), base_with_trained_biases)
        if config.bias == "none":
            assert torch.equal(run(unloaded, x), expected)

    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(original), tmp_path)
    with torch.no_grad():
        assert torch.equal(run(loaded, x), adapted)


def test_gpt2_conv1d_layers_and_several_adapters() -> None:
    original = tiny_gpt2().double().eval()
    x = tokens()
    model = get_orthoft_model(
        copy.deepcopy(original),
        OFTConfig(target_modules=["c_attn"], oft_block_size=4, fan_in_fan_out=True),
        "a",
    )
    get_orthoft_model(
        model, OFTConfig(target_modules=["c_attn", "c_fc"], r=4, oft_block_size=0, fan_in_fan_out=True), "b"
    )
    attention = model.transformer.h[0].attn.c_attn
    assert isinstance(attention, OFTLinear) and isinstance(attention.base_layer, Conv1D)
    assert attention.in_features == DIM and attention.out_features == 3 * DIM
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        for _, layer in named_orthoft_layers(model):
            for parameter in layer.oft_R.parameters():
                parameter.normal_(std=0.1)
        out = {}
        for names in (["a"], ["b"], ["a", "b"]):
            set_adapter(model, names)
            out["+".join(names)] = run(model, x)
        assert not torch.allclose(out["a"], out["b"]) and not torch.allclose(out["a+b"], out["b"])
        with disable_adapters(model):
            assert torch.equal(run(model, x), run(original, x))
        torch.testing.assert_close(run(model, x), out["a+b"], rtol=0, atol=0)
        delete_adapter(model, "a")
        torch.testing.assert_close(run(model, x), out["b"], rtol=0, atol=0)
        assert isinstance(model.transformer.h[1].mlp.c_fc, OrthoftLayer)
        delete_adapter(model, "b")
        assert plain_types(model) == plain_types(original)
        assert torch.equal(run(model, x), run(original, x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adapters_follow_the_model_device_and_dtype(tmp_path: Path, device: str, dtype: torch.dtype) -> None:
    original = TinyTransformer().to(device=device, dtype=dtype).eval()
    config = BOFTConfig(
        target_modules=ATTENTION_AND_MLP,
        boft_block_size=4,
        boft_n_butterfly_factor=2,
        modules_to_save=["lm_head"],
    )
    model = get_orthoft_model(copy.deepcopy(original), config)
    assert all(parameter.device.type == device for parameter in model.parameters())
    assert all(parameter.dtype == dtype for parameter in model.parameters())
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
        x = tokens().to(device)
        adapted = model(x)
        tolerance = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(merge_and_unload(copy.deepcopy(model))(x), adapted, **tolerance)

        save_adapter(model, tmp_path)
        assert torch.equal(load_adapter(copy.deepcopy(original), tmp_path)(x), adapted)
        on_cpu = load_adapter(copy.deepcopy(original).cpu(), tmp_path)
        torch.testing.assert_close(on_cpu(x.cpu()), adapted.cpu(), **tolerance)
