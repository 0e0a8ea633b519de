"""The tuner's conveniences beyond what tests/test_peft_conveniences.py checks against PEFT: a layer's
meta adapters loaded in place, and merging around weights that other modules share."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from orthoft.config import BOFTConfig, OFTConfig
from orthoft.layers import OrthoftLayer
from orthoft.tuner import get_orthoft_model, merge_and_unload, named_orthoft_layers

from tiny_models import tiny_llama as _tiny_llama


def tiny_llama() -> LlamaForCausalLM:
    return _tiny_llama(vocab_size=64)


def test_low_cpu_mem_usage_creates_adapters_on_meta_until_loaded() -> None:
    config = BOFTConfig(
        target_modules=["q_proj", "v_proj"], boft_block_size=8, boft_n_butterfly_factor=2, init_weights=False
    )
    reference_model = get_orthoft_model(tiny_llama(), config)
    ids = torch.randint(0, 64, (2, 7))
    expected = reference_model(ids).logits

    model = get_orthoft_model(tiny_llama(), config, low_cpu_mem_usage=True)
    layers = dict(named_orthoft_layers(model))
    assert all(p.is_meta for layer in layers.values() for p in layer.parameters() if p.requires_grad)
    assert not any(p.is_meta for name, p in model.named_parameters() if "boft_" not in name)
    with pytest.raises(ValueError, match=r"created with low_cpu_mem_usage=True .* load them first"):
        model(ids)
    for path, layer in named_orthoft_layers(reference_model):
        layers[path].load_adapter_state_dict("default", layer.adapter_state_dict("default"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("boft_" in name for name in trainable)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_merge_refuses_weights_shared_with_other_modules() -> None:
    torch.manual_seed(1)
    first, second = nn.Linear(16, 16), nn.Linear(16, 16)
    second.weight = first.weight  # tied
    model = nn.Sequential(first, nn.ReLU(), second)
    get_orthoft_model(model, OFTConfig(target_modules=["0"], oft_block_size=4, init_weights=False))
    with pytest.raises(
        ValueError, match=r"Cannot merge into '0': its base weight is shared with \['2\.weight'\]"
    ):
        merge_and_unload(model)
    assert isinstance(model[0], OrthoftLayer)  # nothing was merged


def test_merge_into_one_layer_reached_at_two_paths_is_allowed() -> None:
    torch.manual_seed(2)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    get_orthoft_model(model, OFTConfig(target_modules=["0", "2"], oft_block_size=4, init_weights=False))
    assert model[0] is model[2]
    x = torch.randn(3, 16)
    expected = model(x)
    merged = merge_and_unload(model)
    assert merged[0] is merged[2] is shared
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
