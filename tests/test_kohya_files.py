"""kohya's names: SD1.5 (diffusers paths) and SDXL (LDM paths), UNet and text encoders, read by LyCORIS."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import orthoft
from orthoft.kohya_names import ldm_unet_path
from orthoft.layers import LycorisLinear

from lycoris_helpers import tiny_unet, train_steps, unet_call

lycoris_kohya = pytest.importorskip("lycoris.kohya")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
lora_conversion_utils = pytest.importorskip("diffusers.loaders.lora_conversion_utils")


@pytest.fixture(autouse=True)
def _no_default_lycoris_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """LyCORIS's kohya network first builds its default modules, which it then replaces by the file's; its
    default names list ``time_embedding.linear_1`` besides the module that holds it, and it stops at the
    duplicate. Without the default names the modules read from the file are the same."""
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])


ATTENTION = r".*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*proj_in|.*proj_out"


@pytest.mark.parametrize("sdxl", [False, True])
def test_ldm_paths_are_diffusers_single_file_layout(sdxl: bool) -> None:
    """Every UNet parameter under its LDM path, converted back by diffusers' own single-file converter."""
    unet = tiny_unet(sdxl)
    checkpoint = {}
    for path, module in unet.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            ldm = ldm_unet_path(path, unet.config)
            assert ldm is not None, path
            checkpoint[f"{single_file_utils.LDM_UNET_KEY}{ldm}.{name}"] = parameter.detach()
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    expected = unet.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[key], value) for key, value in expected.items())


def _text_encoder(with_projection: bool = False) -> torch.nn.Module:
    config = transformers.CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=8,
        projection_dim=32,
    )
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config).eval()


def _text_call(model: torch.nn.Module) -> torch.Tensor:
    output = model(torch.arange(12).reshape(2, 6) % 64)
    return output[0]


def _adapted(model: torch.nn.Module, target: str, algo: str) -> torch.nn.Module:
    config = orthoft.LycorisConfig(
        algo=algo, target_modules=target, block_size=4, rescaled=True, constraint=0.01
    )
    return orthoft.get_orthoft_model(copy.deepcopy(model), config)


def _as_checkpoint(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """A CLIP text encoder seen with its checkpoint paths (``text_model.encoder...``), which transformers 5's
    ``CLIPTextModel`` no longer has, for LyCORIS's loader that names modules by ``named_modules``."""
    if hasattr(text_encoder, "text_model"):
        return text_encoder
    holder = torch.nn.Module()
    holder.text_model = text_encoder
    return holder


def _lycoris_kohya_reads(
    path: Path, text_encoder: object, unet: torch.nn.Module, weights: dict | None = None
) -> None:
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    if isinstance(text_encoder, list):
        text_encoder = [_as_checkpoint(te) for te in text_encoder]
    else:
        text_encoder = _as_checkpoint(text_encoder)
    network, _ = lycoris_kohya.create_network_from_weights(
        1.0, str(path), None, text_encoder, unet, weights_sd=weights
    )
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)


def test_sd15_names_unet_and_text_encoder(tmp_path: Path) -> None:
    base_unet, base_te = tiny_unet(), _text_encoder()
    run = unet_call(base_unet)
    unet = _adapted(base_unet, ATTENTION + r"|.*resnets\.\d+\.conv1", "boft")
    te = _adapted(base_te, r".*self_attn\.(q_proj|v_proj)|.*mlp\.fc1", "diag-oft")
    train_steps(unet, run, steps=1)
    train_steps(te, _text_call, steps=1)
    path = tmp_path / "sd15.safetensors"
    orthoft.save_adapter({"lora_unet": unet, "lora_te": te}, path, format="kohya")
    names = {key.partition(".")[0] for key in load_file(path)}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_up_blocks_1_resnets_2_conv1" in names
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj" in names

    lycoris_unet, lycoris_te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    _lycoris_kohya_reads(path, lycoris_te, lycoris_unet)
    with torch.no_grad():
        torch.testing.assert_close(run(lycoris_unet), run(unet), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(_text_call(lycoris_te), _text_call(te), atol=1e-4, rtol=1e-4)

    # orthoft reads it back: each model by its own prefix.
    models = {"lora_unet": copy.deepcopy(base_unet), "lora_te": copy.deepcopy(base_te)}
    orthoft.load_adapter(models["lora_unet"], path)
    orthoft.load_adapter(models["lora_te"], path)
    assert isinstance(models["lora_te"].encoder.layers[0].mlp.fc1, LycorisLinear)
    with torch.no_grad():
        torch.testing.assert_close(run(models["lora_unet"]), run(unet), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_text_call(models["lora_te"]), _text_call(te), atol=1e-5, rtol=1e-5)


def test_sdxl_names_are_ldm_paths_with_two_text_encoders(tmp_path: Path) -> None:
    base_unet, base_te1, base_te2 = tiny_unet(sdxl=True), _text_encoder(), _text_encoder(with_projection=True)
    run = unet_call(base_unet, sdxl=True)
    unet = _adapted(base_unet, ATTENTION + r"|.*resnets\.\d+\.(conv1|conv2)|conv_in", "diag-oft")
    te1 = _adapted(base_te1, r".*self_attn\.q_proj", "diag-oft")
    te2 = _adapted(base_te2, r".*self_attn\.k_proj", "boft")
    train_steps(unet, run, steps=1)
    for te in (te1, te2):
        train_steps(te, _text_call, steps=1)
    path = tmp_path / "sdxl.safetensors"
    orthoft.save_adapter({"lora_unet": unet, "lora_te1": te1, "lora_te2": te2}, path, format="kohya")
    saved = load_file(path)
    names = {key.partition(".")[0] for key in saved}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_output_blocks_0_0_in_layers_2" in names  # up_blocks.0.resnets.0.conv1
    assert "lora_unet_input_blocks_0_0" in names  # conv_in
    assert {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
    } <= names

    # LyCORIS's kohya loader on the diffusers UNet, after diffusers' own SGM -> diffusers renaming of
    # the block indices (it maps the transformer blocks fully; resnet internals are left to the test above).
    attention = {key: value for key, value in saved.items() if "transformer_blocks" in key or "proj_" in key}
    mapped = lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers(dict(attention), base_unet.config)
    # diffusers' next step (_convert_unet_lora_key) renames the block stacks themselves.
    words = {"input_blocks_": "down_blocks_", "middle_block_": "mid_block_", "output_blocks_": "up_blocks_"}
    renamed = {}
    for key, value in mapped.items():
        for ldm, diffusers in words.items():
            key = key.replace(f"lora_unet_{ldm}", f"lora_unet_{diffusers}")
        renamed[key] = value
    lycoris_unet = copy.deepcopy(base_unet)
    _lycoris_kohya_reads(path, [copy.deepcopy(base_te1), copy.deepcopy(base_te2)], lycoris_unet, renamed)
    attention_only = orthoft.load_adapter(copy.deepcopy(base_unet), _subset(tmp_path, attention))
    with torch.no_grad():
        assert not torch.allclose(run(attention_only), run(base_unet), atol=1e-3)
        torch.testing.assert_close(run(lycoris_unet), run(attention_only), atol=1e-4, rtol=1e-4)

    # Text encoders: LyCORIS's kohya loader with a list of two.
    lycoris_te1, lycoris_te2 = copy.deepcopy(base_te1), copy.deepcopy(base_te2)
    _lycoris_kohya_reads(path, [lycoris_te1, lycoris_te2], copy.deepcopy(base_unet))
    with torch.no_grad():
        torch.testing.assert_close(_text_call(lycoris_te1), _text_call(te1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(_text_call(lycoris_te2), _text_call(te2), atol=1e-4, rtol=1e-4)

    # orthoft reads the whole file back into the three models.
    models = {
        "lora_unet": copy.deepcopy(base_unet),
        "lora_te1": copy.deepcopy(base_te1),
        "lora_te2": copy.deepcopy(base_te2),
    }
    orthoft.load_adapter(models, path)
    with torch.no_grad():
        torch.testing.assert_close(run(models["lora_unet"]), run(unet), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_text_call(models["lora_te2"]), _text_call(te2), atol=1e-5, rtol=1e-5)


def _subset(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "subset.safetensors"
    save_file(tensors, path)
    return path
