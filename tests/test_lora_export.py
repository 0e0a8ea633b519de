"""Export to LoRA: every layer kind and method, checked through the real loaders (PEFT, transformers,
diffusers) against the orthoft model itself and against each layer's merged delta."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import orthoft
from orthoft.config import OrthoftConfig
from orthoft.low_rank import uses_randomized
from orthoft.tuner import named_orthoft_layers

from peft_interop import (  # noqa: F401 (one_thread: a fixture, used by name)
    PEFT_LORA_CONV_DILATES,
    needs_peft_lora_converter,
    one_thread,
    peft_from_pretrained,
    transformers_load_adapter,
)
from tiny_models import tiny_llama, tiny_unet

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(
        "ignore:LoRA adapter added to ConvNd layer with groups > 1",
        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    ),
]

# Full-rank round trips: logits within this relative error (the bar), float32 throughout.
ROUND_TRIP = 1e-4
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
METHODS: dict[str, dict[str, Any]] = {
    "oft": {"peft_type": "OFT", "oft_block_size": 4},
    "boft": {"peft_type": "BOFT", "boft_block_size": 4, "boft_n_butterfly_factor": 2},
}


def peft_lora_conversion() -> Any:
    from peft.tuners.lora import conversion

    return conversion


def perturb(model: nn.Module, scale: float = 0.2) -> None:
    """Adapter tensors far from their identity initialisation, as after training; BOFT's scale near 1."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale
                parameter.copy_(noise + 1 if "boft_s" in name else noise)


def adapted(base: nn.Module, config: dict[str, Any], adapter_name: str = "default") -> nn.Module:
    model = orthoft.get_orthoft_model(copy.deepcopy(base), OrthoftConfig.from_dict(config), adapter_name)
    perturb(model)
    return model


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def tokens() -> torch.Tensor:
    return torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(1))


def llama_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def layer_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each layer's hand-built delta: the merged weight minus the base weight, in PEFT's (out, F) view."""
    deltas = {}
    for path, layer in named_orthoft_layers(model):
        with torch.no_grad():
            delta = layer.get_delta_weight().float()
        deltas[path] = delta.mT if layer.fan_in_fan_out else delta.reshape(delta.shape[0], -1)
    return deltas


def lora_delta(state_dict: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    """``B @ A`` of one exported layer, in the same (out, F) view (embeddings: (num_embeddings, dim))."""
    prefix = f"base_model.model.{path}."
    if prefix + "lora_embedding_A" in state_dict:
        return (state_dict[prefix + "lora_embedding_B"] @ state_dict[prefix + "lora_embedding_A"]).mT
    a, b = state_dict[prefix + "lora_A.weight"], state_dict[prefix + "lora_B.weight"]
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# Round trips through the real loaders, at full rank


@pytest.mark.parametrize("method", list(METHODS))
def test_llama_exports_exactly_at_full_rank_into_peft_and_transformers(
    tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    base = tiny_llama()
    model = adapted(base, {"target_modules": LLAMA_TARGETS, **METHODS[method]})
    expected = llama_logits(model)
    assert relative(llama_logits(base), expected) > 1e-2  # the adapter moves the logits

    report = orthoft.save_as_lora(model, tmp_path, rank=4096, progressbar=False)
    assert len(report.layers) == 15 and report.max_relative_error < 1e-6
    assert {layer.method for layer in report.layers} == {"full rank"}
    # rank 4096 is above every layer's full rank: each layer takes its own, and says so.
    assert len(report.capped_layers) == 15
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"]
    assert saved["rank_pattern"] == saved["alpha_pattern"]

    peft_model = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    assert relative(llama_logits(peft_model), expected) < ROUND_TRIP
    with_adapter = copy.deepcopy(base)
    transformers_load_adapter(with_adapter, tmp_path, caplog)
    assert relative(llama_logits(with_adapter), expected) < ROUND_TRIP


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_gpt2_conv1d_exports_exactly_at_full_rank(tmp_path: Path, method: str) -> None:
    base = tiny_gpt2()
    model = adapted(
        base, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, **METHODS[method]}
    )
    expected = llama_logits(model)
    report = orthoft.save_as_lora(model, tmp_path, rank=1.0, progressbar=False)
    assert {layer.kind for layer in report.layers} == {"transformers' Conv1D"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft_model = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    assert relative(llama_logits(peft_model), expected) < ROUND_TRIP


class ConvNet(nn.Module):
    """3x3, 1x1, strided, dilated and grouped convolutions, each with its own padding."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(4, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect")
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.first, self.pointwise, self.strided, self.dilated, self.grouped):
            x = torch.tanh(conv(x))
        return x


def conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def conv_output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 4, 10, 10, generator=torch.Generator().manual_seed(4)))


CONV_TARGETS = ["first", "pointwise", "strided", "dilated", "grouped"]
CONV_METHODS: dict[str, dict[str, Any]] = {
    "oft": {"peft_type": "OFT", "oft_block_size": 4},
    "boft": {"peft_type": "BOFT", "boft_block_size": 2, "boft_n_butterfly_factor": 2},
}


@pytest.mark.skipif(not PEFT_LORA_CONV_DILATES, reason="PEFT's LoRA Conv2d runs dilated from 0.22 on")
@pytest.mark.parametrize("method", list(CONV_METHODS))
def test_conv_net_exports_exactly_at_full_rank(tmp_path: Path, method: str) -> None:
    base = conv_net()
    model = adapted(base, {"target_modules": CONV_TARGETS, **CONV_METHODS[method]})
    expected = conv_output(model)
    report = orthoft.save_as_lora(model, tmp_path, rank=1.0, progressbar=False)
    # The grouped conv's full rank: 2 groups of min(4 outputs, 4*9 filter entries).
    assert {layer.path: layer.max_rank for layer in report.layers}["grouped"] == 8
    peft_model = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    assert relative(conv_output(peft_model), expected) < ROUND_TRIP


def test_grouped_conv_splits_the_rank_between_groups(tmp_path: Path) -> None:
    base = conv_net()
    model = adapted(base, {"target_modules": ["grouped"], "peft_type": "OFT", "oft_block_size": 4})
    _, state_dict, report = orthoft.convert_to_lora(model, 4, progressbar=False)
    a, b = (
        state_dict["base_model.model.grouped.lora_A.weight"],
        state_dict["base_model.model.grouped.lora_B.weight"],
    )
    assert a.shape == (4, 8, 3, 3) and b.shape == (8, 2, 1, 1)
    # Group 0's ranks see only group 0's input channels.
    assert not a[:2, 4:].any() and not a[2:, :4].any()
    delta = layer_deltas(model)["grouped"]
    best = sum(  # two ranks per group of 4 outputs, Eckart-Young in each
        torch.linalg.svdvals(delta[rows].double())[2:].square().sum() for rows in (slice(0, 4), slice(4, 8))
    )
    assert report.layers[0].relative_error == pytest.approx(
        float(best.sqrt() / delta.double().norm()), rel=1e-4
    )
    with pytest.raises(ValueError, match=r"OFTConv2d 'grouped' has groups=2.*rank 3.*multiple of 2"):
        orthoft.convert_to_lora(model, 3, progressbar=False)


def test_bitsandbytes_4bit_base_exports_against_its_dequantized_weight(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")

    def quantized() -> nn.Sequential:
        torch.manual_seed(0)
        linear = nn.Linear(64, 96)
        layer = bnb.nn.Linear4bit(64, 96, compute_dtype=torch.float32, quant_type="nf4")
        layer.load_state_dict(linear.state_dict())
        # On CPUs with AVX512-BF16, bitsandbytes' inference forward repacks the weight for a bfloat16
        # kernel (~3e-3 relative error); the float32 dequantized path is the one compared here.
        layer.support_avx512bf16_for_cpu = False
        return nn.Sequential(layer.to("cpu")).eval()  # quantizes

    model = adapted(quantized(), {"target_modules": ["0"], "peft_type": "OFT", "oft_block_size": 8})
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    report = orthoft.save_as_lora(model, tmp_path, rank=64, progressbar=False)
    assert report.layers[0].kind == "bitsandbytes Linear4bit" and report.layers[0].rank == 64
    peft_model = peft_from_pretrained(quantized(), tmp_path)
    assert isinstance(peft_model.base_model.model[0].get_base_layer(), bnb.nn.Linear4bit)
    with torch.no_grad():
        assert relative(peft_model(x), expected) < ROUND_TRIP


# ---------------------------------------------------------------------------------------------
# Ranks, errors and the comparison with PEFT's own converter


def test_errors_fall_with_rank_and_match_the_layers_merged_deltas() -> None:
    model = adapted(tiny_llama(), {"target_modules": LLAMA_TARGETS, **METHODS["boft"]})
    deltas = layer_deltas(model)
    previous = dict.fromkeys(deltas, 1.0)
    for rank in (1, 4, 8, 16, 32):
        _, state_dict, report = orthoft.convert_to_lora(model, rank, progressbar=False)
        for layer in report.layers:
            assert layer.rank == min(rank, layer.max_rank)
            measured = relative(lora_delta(state_dict, layer.path), deltas[layer.path])
            assert layer.relative_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
            assert layer.relative_error <= previous[layer.path] + 1e-6
            previous[layer.path] = layer.relative_error
    assert max(previous.values()) < 1e-5  # rank 32 is every layer's full rank


def test_float_rank_keeps_the_energy_fraction_per_layer_and_peft_reads_the_ranks(tmp_path: Path) -> None:
    base = tiny_llama()
    model = adapted(base, {"target_modules": ["q_proj", "v_proj", "down_proj"], **METHODS["oft"]})
    deltas = layer_deltas(model)
    report = orthoft.save_as_lora(model, tmp_path, rank=0.8, progressbar=False)
    for layer in report.layers:
        energy = torch.linalg.svdvals(deltas[layer.path].double()).square()
        kept = energy.cumsum(0) / energy.sum()
        # The fewest singular values that hold 80% of the energy.
        assert kept[layer.rank - 1] >= 0.8 > (kept[layer.rank - 2] if layer.rank > 1 else 0.0)
        assert layer.relative_error == pytest.approx(float((1 - kept[layer.rank - 1]).sqrt()), rel=1e-3)
    assert len({layer.rank for layer in report.layers}) > 1
    peft_model = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    for layer in report.layers:
        lora = peft_model.base_model.model.get_submodule(layer.path)
        assert lora.r["default"] == layer.rank and lora.scaling["default"] == 1.0


@needs_peft_lora_converter
@pytest.mark.parametrize("svd", ["auto", "exact", "randomized"])
def test_error_is_no_larger_than_peft_converters_at_the_same_rank(tmp_path: Path, svd: str) -> None:
    base = tiny_llama(hidden_size=64, intermediate_size=128)
    model = adapted(base, {"target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"], **METHODS["oft"]})
    orthoft.save_adapter(model, tmp_path)
    peft_oft = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    deltas = layer_deltas(model)
    for rank in (2, 8):
        _, peft_state = peft_lora_conversion().convert_to_lora(peft_oft, rank)
        _, ours, report = orthoft.convert_to_lora(model, rank, svd=svd, progressbar=False)
        assert set(ours) == set(peft_state)  # the same keys as PEFT's converter
        for layer in report.layers:
            peft_error = relative(lora_delta(peft_state, layer.path), deltas[layer.path])
            # Every method reaches the optimum PEFT's exact SVD gives, to float32 rounding.
            assert layer.relative_error <= peft_error * (1 + 1e-5), (layer, peft_error)


@needs_peft_lora_converter
@pytest.mark.parametrize("oft_block_size", [32, 64])
def test_default_export_has_peft_converters_error_at_ranks_far_below_full(
    tmp_path: Path, oft_block_size: int
) -> None:
    """The default paths (the Krylov method for the smallest ranks, the Gram eigendecomposition above)
    against PEFT's exact SVD: the same error to within float rounding, on a square and a wide layer of
    full rank 1024 and 768."""
    base = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 768))
    model = adapted(
        base, {"target_modules": ["0", "2"], "peft_type": "OFT", "oft_block_size": oft_block_size}
    )
    orthoft.save_adapter(model, tmp_path)
    peft_oft = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    deltas = layer_deltas(model)
    for rank in (2, 8, 16, 64):
        _, peft_state = peft_lora_conversion().convert_to_lora(peft_oft, rank)
        _, ours, report = orthoft.convert_to_lora(model, rank, progressbar=False)
        for layer in report.layers:
            krylov = uses_randomized(rank, layer.max_rank)
            assert layer.method == ("randomized SVD" if krylov else "Gram eigendecomposition")
            assert layer.rank == rank
            peft_error = relative(lora_delta(peft_state, layer.path), deltas[layer.path])
            ours_error = relative(lora_delta(ours, layer.path), deltas[layer.path])
            assert ours_error == pytest.approx(layer.relative_error, rel=1e-6)
            assert abs(ours_error - peft_error) <= 1e-5 * peft_error, (layer, peft_error)


def test_composed_active_adapters_export_as_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = tiny_llama()
    model = adapted(base, {"target_modules": ["q_proj", "v_proj"], **METHODS["oft"]}, "first")
    orthoft.get_orthoft_model(
        model,
        OrthoftConfig.from_dict(
            {"target_modules": ["v_proj", "down_proj"], "peft_type": "OFT", "oft_block_size": 8}
        ),
        "second",
    )
    perturb(model)
    orthoft.set_adapter(model, ["first", "second"])
    expected = llama_logits(model)
    report = orthoft.save_as_lora(model, tmp_path, rank=1.0, adapter_name=None, progressbar=False)
    assert len(report.layers) == 6  # q_proj, v_proj and down_proj in two layers
    peft_model = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    assert relative(llama_logits(peft_model), expected) < ROUND_TRIP
    # One adapter alone, from the same model.
    orthoft.set_adapter(model, "second")
    expected_second = llama_logits(model)
    orthoft.save_as_lora(model, tmp_path / "second", rank=1.0, adapter_name="second", progressbar=False)
    assert relative(
        llama_logits(peft_from_pretrained(copy.deepcopy(base), tmp_path / "second")), expected_second
    ) < (ROUND_TRIP)


def test_modules_to_save_travel_with_the_lora_adapter(tmp_path: Path) -> None:
    base = tiny_llama()
    config = {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], **METHODS["oft"]}
    model = adapted(base, config)
    expected = llama_logits(model)
    config_out, state_dict, _ = orthoft.convert_to_lora(model, 1.0, progressbar=False)
    assert config_out.modules_to_save == ["lm_head"] and "base_model.model.lm_head.weight" in state_dict
    orthoft.save_as_lora(model, tmp_path, 1.0, progressbar=False)
    assert relative(llama_logits(peft_from_pretrained(copy.deepcopy(base), tmp_path)), expected) < ROUND_TRIP


def test_report_prints_a_table_with_every_layer() -> None:
    model = adapted(tiny_llama(), {"target_modules": ["q_proj", "v_proj"], **METHODS["oft"]})
    report = orthoft.convert_to_lora(model, 24, progressbar=False).report
    table = str(report)
    assert "relative error" in table and "2 layers at their full rank" in table
    for layer in report.layers:
        assert layer.path in table
    assert report.capped_layers == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_export_dtype_is_the_base_weights_or_the_one_asked_for() -> None:
    base = tiny_llama().to(torch.bfloat16)
    model = adapted(base, {"target_modules": ["q_proj"], **METHODS["oft"]})
    _, state_dict, report = orthoft.convert_to_lora(model, 1.0, progressbar=False)
    assert {value.dtype for value in state_dict.values()} == {torch.bfloat16}
    # The error of the stored bfloat16 factors, not of the float32 ones.
    assert 1e-4 < report.max_relative_error < 1e-2
    _, state_dict, report = orthoft.convert_to_lora(model, 1.0, dtype=torch.float32, progressbar=False)
    assert {value.dtype for value in state_dict.values()} == {torch.float32}
    assert report.max_relative_error < 1e-6


# ---------------------------------------------------------------------------------------------
# diffusers


def unet_output(unet: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(6)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 3, 16, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


@pytest.mark.parametrize("method", list(METHODS))
def test_diffusers_unet_loads_the_export_with_load_lora_adapter(
    tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    model = adapted(tiny_unet(), {"target_modules": targets, **METHODS[method]})
    expected = unet_output(model)
    assert relative(unet_output(tiny_unet()), expected) > 1e-2
    report = orthoft.save_as_lora(model, tmp_path, rank=1.0, progressbar=False)
    assert {layer.kind for layer in report.layers} == {"torch.nn.Linear", "torch.nn.Conv2d"}
    unet = tiny_unet()
    with caplog.at_level("WARNING"):
        unet.load_lora_adapter(
            str(tmp_path),
            weight_name="adapter_model.safetensors",
            prefix="base_model.model",
            adapter_name="exported",
        )
    assert not [r for r in caplog.records if "unexpected" in r.getMessage() or "missing" in r.getMessage()]
    assert relative(unet_output(unet), expected) < ROUND_TRIP


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing changes


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    ("rank", "error"),
    [
        (0, ValueError),
        (-3, ValueError),
        (0.0, ValueError),
        (1.5, ValueError),
        (True, TypeError),
        ("8", TypeError),
    ],
)
def test_bad_rank_is_an_error_naming_the_valid_range(tmp_path: Path, rank: object, error: type) -> None:
    model = adapted(tiny_llama(), {"target_modules": ["q_proj"], **METHODS["oft"]})
    before = snapshot(model)
    with pytest.raises(error, match=r"rank must be an int >= 1 or a float in \(0, 1\]"):
        orthoft.save_as_lora(model, tmp_path / "out", rank, progressbar=False)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_unknown_adapter_merged_adapters_and_trained_biases_are_errors() -> None:
    model = adapted(tiny_llama(), {"target_modules": ["q_proj"], **METHODS["oft"]})
    with pytest.raises(
        ValueError, match=r"adapter_name must name adapters of the model, got 'other'.*\['default'\]"
    ):
        orthoft.convert_to_lora(model, 4, adapter_name="other", progressbar=False)
    with pytest.raises(ValueError, match=r"svd must be one of"):
        orthoft.convert_to_lora(model, 4, svd="fast", progressbar=False)
    with pytest.raises(ValueError, match=r"svd='randomized' needs an int rank, got rank=0.5"):
        orthoft.convert_to_lora(model, 0.5, svd="randomized", progressbar=False)
    layer = model.get_submodule("model.layers.1.self_attn.q_proj")
    layer.merge()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"OFTLinear 'model.layers.1.self_attn.q_proj'.*merged.*unmerge"):
        orthoft.convert_to_lora(model, 4, progressbar=False)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    layer.unmerge()
    with_bias = adapted(tiny_llama(), {"target_modules": ["q_proj"], "bias": "oft_only", **METHODS["oft"]})
    with pytest.raises(ValueError, match=r"trains biases \(bias='oft_only'\)"):
        orthoft.convert_to_lora(with_bias, 4, progressbar=False)
    with pytest.raises(ValueError, match=r"has no orthoft adapters"):
        orthoft.convert_to_lora(tiny_llama(), 4, progressbar=False)


def test_a_layer_whose_weight_cannot_be_read_is_a_type_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    model = adapted(tiny_llama(), {"target_modules": ["q_proj"], **METHODS["oft"]})
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    forward_only = dataclasses.replace(layer.base_kind, merge_blocker=lambda module: "a forward-only kind")
    monkeypatch.setattr(layer, "base_kind", forward_only)
    with pytest.raises(
        TypeError, match=r"OFTLinear 'model.layers.0.self_attn.q_proj': cannot merge.*forward-only"
    ):
        orthoft.convert_to_lora(model, 4, progressbar=False)


# ---------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)])
def test_cuda_export_stays_on_the_gpu_and_equals_the_cpu_export(device: str) -> None:
    model = adapted(tiny_llama(), {"target_modules": LLAMA_TARGETS, **METHODS["boft"]})
    _, on_cpu, _ = orthoft.convert_to_lora(model, 1.0, progressbar=False)
    model.to(device)
    _, on_device, report = orthoft.convert_to_lora(model, 1.0, progressbar=False)
    assert {value.device.type for value in on_device.values()} == {device}
    assert report.max_relative_error < 1e-5
    for key, value in on_cpu.items():
        assert torch.allclose(on_device[key].cpu(), value, rtol=1e-4, atol=1e-5), key
    _, low_rank, report = orthoft.convert_to_lora(model, 8, progressbar=False)
    assert {value.device.type for value in low_rank.values()} == {device}


class Nested(nn.Module):
    """A top-level ``fc`` and an ``inner.fc``: PEFT's name lists would match both with ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.inner = nn.Sequential()
        self.inner.add_module("fc", nn.Linear(16, 16))
        self.inner.add_module("proj", nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.proj(self.inner.fc(torch.tanh(self.fc(x))))


def test_paths_that_end_other_paths_are_targeted_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = Nested().eval()
    model = adapted(base, {"target_modules": r"fc|inner\.proj", **METHODS["oft"]})
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(x)
    config, _, report = orthoft.convert_to_lora(model, 16, progressbar=False)
    assert [layer.rank for layer in report.layers] == [16, 8]
    assert isinstance(config.target_modules, str) and config.rank_pattern == {r"^inner\.proj": 8}
    orthoft.save_as_lora(model, tmp_path, 16, progressbar=False)
    peft_model = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(peft_model.base_model.model.inner.fc, nn.Linear)  # not given a LoRA
    assert peft_model.base_model.model.inner.proj.r["default"] == 8
    with torch.no_grad():
        assert relative(peft_model(x), expected) < ROUND_TRIP
