"""LyCORIS files: LyCORIS's load into orthoft, orthoft's into LyCORIS, with equal outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import orthoft
from orthoft.layers import LycorisConv2d, LycorisLinear

from lycoris_helpers import (
    SmallNet,
    lycoris_trained,
    quiet_lycoris,
    small_inputs,
    tiny_unet,
    train_steps,
    unet_call,
)

lycoris = pytest.importorskip("lycoris")

SETTINGS = [(0.0, False), (0.0, True), (1e-3, False), (1e-3, True)]


def _lycoris_reads(base: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of ``base`` with the network ``lycoris.create_lycoris_from_weights`` builds from ``path``."""
    quiet_lycoris()
    model = copy.deepcopy(base)
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    network.apply_to()
    return model


def _close(out: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
@pytest.mark.parametrize(("constraint", "rescaled"), SETTINGS)
def test_small_net_round_trip(tmp_path: Path, algo: str, constraint: float, rescaled: bool) -> None:
    base = SmallNet()
    x, image = small_inputs()

    def run(model: torch.nn.Module) -> torch.Tensor:
        return model(x, image)

    options = {"algo": algo, "constraint": constraint, "rescaled": rescaled, "linear_dim": 4}
    trained, network = lycoris_trained(base, run, **options)
    network.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float32, None)

    low_memory = orthoft.load_adapter(
        copy.deepcopy(base), tmp_path / "lycoris.safetensors", low_cpu_mem_usage=True
    )
    model = orthoft.load_adapter(copy.deepcopy(base), tmp_path / "lycoris.safetensors")
    assert not any(p.is_meta for p in low_memory.parameters())
    torch.testing.assert_close(run(low_memory), run(model), atol=0, rtol=0)
    assert isinstance(model.fc1, LycorisLinear) and isinstance(model.conv, LycorisConv2d)
    assert not torch.allclose(run(trained), run(base), atol=1e-3)  # LyCORIS's training moved it
    _close(run(model), run(trained))

    train_steps(model, run)
    orthoft.save_adapter(model, tmp_path / "orthoft.safetensors")
    with torch.no_grad():
        _close(run(_lycoris_reads(base, tmp_path / "orthoft.safetensors")), run(model))


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_config_adapter_is_identity_trains_merges_and_lycoris_reads_it(tmp_path: Path, algo: str) -> None:
    base = SmallNet().double()
    x, image = (t.double() for t in small_inputs())

    def run(model: torch.nn.Module) -> torch.Tensor:
        return model(x, image)

    config = orthoft.LycorisConfig(
        algo=algo, target_modules=["fc1", "fc2", "conv"], block_size=4, constraint=0.01, rescaled=True
    )
    model = orthoft.get_orthoft_model(copy.deepcopy(base), config)
    torch.testing.assert_close(run(model), run(base), atol=1e-13, rtol=0)
    train_steps(model, run, steps=3)
    adapted = run(model).detach()
    assert not torch.allclose(adapted, run(base), atol=1e-3)
    orthoft.save_adapter(model, tmp_path / "adapter.safetensors")
    saved = load_file(tmp_path / "adapter.safetensors")
    assert {"lycoris_fc1.alpha", "lycoris_conv.rescale", "lycoris_fc2.oft_blocks"} <= set(saved)
    with torch.no_grad():
        reader = _lycoris_reads(copy.deepcopy(base).float(), tmp_path / "adapter.safetensors")
        _close(reader(x.float(), image.float()), adapted.float())
    merged = orthoft.merge_and_unload(model)
    assert isinstance(merged.fc1, torch.nn.Linear)
    torch.testing.assert_close(run(merged), adapted, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_unet_round_trip(tmp_path: Path, algo: str) -> None:
    base = tiny_unet()
    run = unet_call(base)
    trained, network = lycoris_trained(
        base, run, steps=1, algo=algo, rescaled=True, constraint=1e-3, linear_dim=8
    )
    network.save_weights(str(tmp_path / "unet.safetensors"), torch.float32, None)
    model = orthoft.load_adapter(copy.deepcopy(base), tmp_path / "unet.safetensors")
    with torch.no_grad():
        _close(run(model), run(trained))
    train_steps(model, run, steps=1)
    orthoft.save_adapter(model, tmp_path / "again.safetensors")
    with torch.no_grad():
        _close(run(_lycoris_reads(base, tmp_path / "again.safetensors")), run(model))


def _file_with(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    return path


def _blocks() -> dict[str, torch.Tensor]:
    return {"lycoris_fc1.oft_blocks": torch.zeros(8, 4, 4), "lycoris_fc1.alpha": torch.tensor(0.0)}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"lycoris_fc2.lora_down.weight": torch.zeros(4, 32)},
            r"'lycoris_fc2\.lora_down\.weight' is not a diag-OFT",
        ),
        (
            {"lycoris_conv.oft_blocks": torch.zeros(3, 4, 4), "lycoris_conv.alpha": torch.tensor(0.0)},
            r"module 'lycoris_conv' \('conv'\).*oft_blocks",
        ),
        ({"lycoris_fc2.rescale": torch.ones(16, 1)}, r"module 'lycoris_fc2' has \['rescale'\] but no"),
    ],
)
def test_bad_files_name_the_key_and_leave_the_model(
    tmp_path: Path, extra: dict[str, torch.Tensor], message: str
) -> None:
    model = SmallNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        orthoft.load_adapter(model, _file_with(tmp_path, {**_blocks(), **extra}))
    assert isinstance(model.fc1, torch.nn.Linear) and isinstance(model.conv, torch.nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unmatched_names_warn_and_a_file_matching_nothing_fails(tmp_path: Path) -> None:
    model = SmallNet()
    extra = {"lycoris_decoder_proj.oft_blocks": torch.zeros(8, 4, 4)}
    with pytest.warns(UserWarning, match=r"1 modules match nothing in SmallNet: lycoris_decoder_proj"):
        orthoft.load_adapter(model, _file_with(tmp_path, {**_blocks(), **extra}))
    assert isinstance(model.fc1, LycorisLinear) and isinstance(model.fc2, torch.nn.Linear)
    other = SmallNet()
    with pytest.raises(
        ValueError, match=r"no module name matches under prefixes \[.lycoris.\].*lycoris_decoder_proj"
    ):
        orthoft.load_adapter(other, _file_with(tmp_path, extra))
    assert isinstance(other.fc1, torch.nn.Linear)


def test_peft_format_refuses_a_lycoris_adapter(tmp_path: Path) -> None:
    model = orthoft.get_orthoft_model(SmallNet(), orthoft.LycorisConfig(target_modules=["fc1"], block_size=4))
    with pytest.raises(ValueError, match=r"PEFT cannot read; save it with format='lycoris' or 'kohya'"):
        orthoft.save_adapter(model, tmp_path / "dir", format="peft")
    with pytest.raises(ValueError, match=r"`bias` must be 'none'"):
        orthoft.LycorisConfig(target_modules=["fc1"], bias="all")
    with pytest.raises(ValueError, match=r"`target_parameters` must be empty .*OFTConfig or BOFTConfig"):
        orthoft.LycorisConfig(target_modules=["fc1"], target_parameters=["fc2.weight"])


def test_two_files_load_as_two_adapters(tmp_path: Path) -> None:
    base = SmallNet()
    x, image = small_inputs()
    paths = []
    outputs = []
    for algo in ("diag-oft", "boft"):
        config = orthoft.LycorisConfig(
            algo=algo, target_modules=["fc1", "conv"], block_size=4, init_weights=False
        )
        model = orthoft.get_orthoft_model(copy.deepcopy(base), config)
        paths.append(tmp_path / f"{algo}.safetensors")
        orthoft.save_adapter(model, paths[-1])
        outputs.append(model(x, image).detach())
    model = copy.deepcopy(base)
    orthoft.load_adapter(model, paths[0], adapter_name="first")
    orthoft.load_adapter(model, paths[1], adapter_name="second")
    assert orthoft.active_adapters(model) == ["first"]
    torch.testing.assert_close(model(x, image), outputs[0], atol=1e-6, rtol=1e-6)
    orthoft.set_adapter(model, "second")
    torch.testing.assert_close(model(x, image), outputs[1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"already has an adapter named 'second'"):
        orthoft.load_adapter(model, paths[0], adapter_name="second")
