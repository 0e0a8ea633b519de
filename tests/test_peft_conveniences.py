"""PEFT's conveniences, checked against PEFT where it has them: default targets by model type, adapters
created on the meta device until loaded, merging refused for replicated base layers."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.tuners_utils import replicate_layers
from transformers import ResNetConfig, ResNetForImageClassification

from orthoft.adapter_io import load_adapter, save_adapter
from orthoft.config import BOFTConfig, OFTConfig, OrthoftConfig
from orthoft.layers import OrthoftLayer
from orthoft.tuner import get_orthoft_model, merge_and_unload

from tiny_models import tiny_llama

pytestmark = pytest.mark.filterwarnings(
    "ignore:Failed to load the CUDA extension",
    "ignore:Setting boft_n_butterfly_factor to 1",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
)


def adapted_paths(model: torch.nn.Module) -> set[str]:
    return {path for path, module in model.named_modules() if isinstance(module, OrthoftLayer)}


@pytest.mark.parametrize("config", [OFTConfig(oft_block_size=8), BOFTConfig(boft_block_size=4)])
def test_no_target_modules_takes_peft_s_default_for_the_model_type(config: OrthoftConfig) -> None:
    peft_config = peft.get_peft_config({k: v for k, v in config.to_dict().items() if v is not None})
    peft_model = peft.get_peft_model(tiny_llama(), peft_config)
    expected = {name.removeprefix("base_model.model.") for name in peft_model.targeted_module_names}
    assert expected == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert adapted_paths(get_orthoft_model(tiny_llama(), config)) == expected


def test_no_default_targets_is_an_error_naming_the_model_type() -> None:
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    with pytest.raises(ValueError, match=r"target_modules.*model type 'resnet'"):
        get_orthoft_model(model, OFTConfig(oft_block_size=8))


def test_low_cpu_mem_usage_puts_adapters_on_meta_until_loaded(tmp_path: Path) -> None:
    config = OFTConfig(target_modules=["q_proj", "v_proj"], oft_block_size=8, init_weights=False)
    base = tiny_llama()
    trained = get_orthoft_model(copy.deepcopy(base), config)
    save_adapter(trained, tmp_path)

    empty = get_orthoft_model(copy.deepcopy(base), config, low_cpu_mem_usage=True)
    adapter = [p for p in empty.parameters() if p.requires_grad]
    assert adapter and all(p.is_meta for p in adapter)

    loaded = load_adapter(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    x = torch.randint(0, 48, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, trained(input_ids=x).logits)


def test_merging_refuses_replicated_base_layers() -> None:
    """PEFT's layer replication: layers 0, 1 repeated share their weights, so merging would rotate each
    shared weight once per copy. PEFT refuses; so must orthoft, naming the shared layers."""
    model = tiny_llama()
    replicate_layers(model, [(0, 2), (0, 2)])
    get_orthoft_model(model, OFTConfig(target_modules=["q_proj"], oft_block_size=8, init_weights=False))
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*model\.layers\.2\.self_attn\.q_proj"
    ):
        merge_and_unload(model)
