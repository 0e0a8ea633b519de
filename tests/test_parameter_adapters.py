"""OFT and BOFT on raw parameters (``target_parameters``): fused MoE expert weights of transformers models
built from configs (Qwen3-MoE, gpt-oss, Mixtral) and a hand-made module with 3-D and 2-D parameters.

The oracle is the model with each adapted parameter replaced by a hand-built merged weight
``W'_e = (W_e @ R_e^T) * s_e``, ``R_e`` assembled densely from the adapter's tensors with
``orthoft.reference`` (float64), and, for the meaning of a rotation, the experts run on rotated inputs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import orthoft
from orthoft import BOFTConfig, OFTConfig, reference
from orthoft.adapter_io import adapter_state_dict
from orthoft.layers.parameter import BOFTParameter, OFTParameter, ParameterLayer
from orthoft.tuner import named_orthoft_layers

from helpers import assert_close_rel
from peft_interop import one_thread  # noqa: F401 (a fixture, used by name)
from tiny_moe import EXPERT_PARAMETERS, VOCAB, hand_made, tiny_gpt_oss, tiny_mixtral, tiny_qwen3_moe

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Model:
    build: Callable[..., nn.Module]  # (seed, **config overrides) -> model
    targets: list[str]
    token_ids: bool  # takes input_ids (transformers) or a float tensor (hand-made)


MODELS = {
    "qwen3_moe": Model(tiny_qwen3_moe, EXPERT_PARAMETERS, True),
    "gpt_oss": Model(tiny_gpt_oss, EXPERT_PARAMETERS, True),
    "mixtral": Model(tiny_mixtral, EXPERT_PARAMETERS, True),
    "hand_made": Model(lambda seed=0, **_: hand_made(seed), ["block.up", "block.proj"], False),
    "hand_made_transposed": Model(
        lambda seed=0, **_: hand_made(seed, transposed=True), ["block.up", "block.proj"], False
    ),
}
TRANSFORMERS_MODELS = ["qwen3_moe", "gpt_oss", "mixtral"]

METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "oft": (OFTConfig, {"oft_block_size": 4, "init_weights": False}),
    "oft_exact_shared": (
        OFTConfig,
        {
            "r": 2,
            "oft_block_size": 0,
            "block_share": True,
            "use_cayley_neumann": False,
            "init_weights": False,
        },
    ),
    "boft": (BOFTConfig, {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "init_weights": False}),
}


def config_for(method: str, targets: list[str], **overrides: Any) -> Any:
    config_cls, options = METHODS[method]
    fields = {"target_modules": [], "target_parameters": targets, **options, **overrides}
    return config_cls(**fields)


def make(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides: Any) -> nn.Module:
    if dtype == torch.float64 and name in TRANSFORMERS_MODELS:
        overrides.setdefault("experts_implementation", "eager")  # grouped matmuls take no float64
    return MODELS[name].build(seed, **overrides).to(dtype)


def inputs(name: str, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    if MODELS[name].token_ids:
        return {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=generator)}
    return {"x": torch.randn(5, 16, generator=generator, dtype=dtype)}


def run(model: nn.Module, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    out = model(**inputs(name, dtype))
    return getattr(out, "logits", out)


# ---------------------------------------------------------------------------------------------
# The hand-built oracle


def expert_rotations(layer: ParameterLayer, adapter_name: str) -> torch.Tensor:
    """The dense ``(E, in, in)`` rotations of one adapter, from its tensors and the reference operators."""
    options, tensors, experts = layer.adapter_options[adapter_name], layer.adapter_state_dict(adapter_name), 0
    experts = layer.num_experts
    if isinstance(layer, OFTParameter):
        b = options.block_size
        packed = tensors["oft_R.weight"].detach()
        rows, cols = torch.triu_indices(b, b, 1)
        upper = packed.new_zeros(packed.shape[0], b, b)
        upper[:, rows, cols] = packed
        terms = options.num_cayley_neumann_terms if options.use_cayley_neumann else 0
        blocks = reference.cayley(upper - upper.mT, terms).view(experts, -1, b, b)
        blocks = blocks.expand(experts, options.r, b, b)
        return torch.stack([torch.block_diag(*blocks[e]) for e in range(experts)])
    raw = tensors["boft_R"].detach()
    m, n, b, _ = raw.shape
    blocks = reference.cayley(0.5 * (raw - raw.mT).reshape(-1, b, b), 0).view(m, n, b, b)
    d = n // experts
    return torch.stack(
        [reference.butterfly_matrix(blocks[:, e * d : (e + 1) * d], b) for e in range(experts)]
    )


def hand_merged(
    layer: ParameterLayer, weight: torch.Tensor, adapter_names: list[str], transposed: bool
) -> torch.Tensor:
    """``weight`` with ``adapter_names`` applied in order; ``transposed``: stored ``(experts, in, out)``."""
    flat = weight.dim() == 2
    canonical = weight.unsqueeze(0) if flat else (weight.mT if transposed else weight)
    for name in adapter_names:
        canonical = canonical @ expert_rotations(layer, name).mT
        if isinstance(layer, BOFTParameter):
            canonical = canonical * layer.boft_s[name].detach().view(layer.num_experts, -1, 1)
    return canonical.squeeze(0) if flat else (canonical.mT if transposed else canonical)


def holder_path(layer_path: str) -> str:
    return layer_path.replace(".base_layer", "")


def hand_built_model(base: nn.Module, adapted: nn.Module, adapter_names: list[str]) -> nn.Module:
    """A copy of ``base`` whose adapted parameters hold the hand-built merged weights."""
    expected = copy.deepcopy(base)
    for path, layer in named_orthoft_layers(adapted):
        assert isinstance(layer, ParameterLayer)
        holder = expected.get_submodule(holder_path(path))
        original = getattr(holder, layer.parameter_name)
        held = [name for name in adapter_names if name in layer.adapter_names]
        with torch.no_grad():
            # The layout as the model declares it (transformers' flag), not as the layer read it.
            transposed = getattr(holder, "is_transposed", False)
            original.copy_(hand_merged(layer, original.detach(), held, transposed))
    return expected


def perturb(model: nn.Module) -> None:
    """Trained-looking adapter tensors: random skew parts and scales near one."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "boft_s" in name:
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            elif "oft_R" in name or "boft_R" in name:
                parameter.copy_(0.2 * torch.randn_like(parameter))


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_adapted_model_is_the_hand_built_merged_model(model_name: str, method: str) -> None:
    base = make(model_name)
    model = orthoft.get_orthoft_model(copy.deepcopy(base), config_for(method, MODELS[model_name].targets))
    perturb(model)
    layers = named_orthoft_layers(model)
    assert len(layers) == 2 * (2 if model_name in TRANSFORMERS_MODELS else 1)
    expected = run(hand_built_model(base, model, ["default"]), model_name)
    out = run(model, model_name)
    assert_close_rel(out, expected, torch.float64)
    assert (out - run(base, model_name)).abs().max() > 1e-4  # the adapters do change the model

    originals = {name: p.detach().clone() for name, p in base.named_parameters()}
    for _, layer in layers:
        layer.merge()
    assert_close_rel(run(model, model_name), expected, torch.float64)
    for _, layer in layers:
        layer.unmerge()
    restored = {holder_path(name): p for name, p in model.named_parameters()}
    assert all(torch.equal(restored[name], value) for name, value in originals.items())

    merged = orthoft.merge_and_unload(model)
    assert not any(isinstance(module, ParameterLayer) for module in merged.modules())
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]  # each class kept
    assert_close_rel(run(merged, model_name), expected, torch.float64)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", ["oft", "boft"])
def test_identity_at_init(model_name: str, method: str) -> None:
    base = make(model_name, torch.float32)
    config = config_for(method, MODELS[model_name].targets, init_weights=True)
    model = orthoft.get_orthoft_model(copy.deepcopy(base), config)
    assert torch.equal(run(model, model_name, torch.float32), run(base, model_name, torch.float32))


@pytest.mark.parametrize(
    ("model_name", "implementation"),
    [("qwen3_moe", "grouped_mm"), ("qwen3_moe", "batched_mm"), ("gpt_oss", "grouped_mm")],
)
def test_every_experts_implementation_runs_the_rotated_weights(model_name: str, implementation: str) -> None:
    """transformers' grouped and batched matmul forwards (float32) give the float64 oracle's output."""
    config = config_for("boft", MODELS[model_name].targets)
    model = orthoft.get_orthoft_model(
        make(model_name, torch.float32, experts_implementation=implementation), config
    )
    perturb(model)
    float64 = orthoft.get_orthoft_model(make(model_name), config)
    float64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    expected = run(hand_built_model(make(model_name), float64, ["default"]), model_name)
    assert_close_rel(run(model, model_name, torch.float32), expected, torch.float32)


@pytest.mark.parametrize("model_name", ["qwen3_moe", "gpt_oss"])
def test_each_expert_computes_w_times_its_rotation_of_the_input(model_name: str) -> None:
    """The meaning, independent of merged weights: expert ``e`` adapted on ``gate_up_proj`` maps ``x`` as the
    frozen expert maps ``x @ R_e`` (for gpt-oss, whose weight is stored transposed, too)."""
    base = make(model_name)
    config = config_for("oft", ["mlp.experts.gate_up_proj"])
    model = orthoft.get_orthoft_model(copy.deepcopy(base), config)
    perturb(model)
    experts = model.model.layers[0].mlp.experts
    frozen = base.model.layers[0].mlp.experts
    rotations = experts.get_rotation()
    assert_close_rel(rotations, expert_rotations(experts, "default"), torch.float64)
    x = torch.randn(6, 32, dtype=torch.float64)
    for e in range(4):
        index, weights = torch.full((6, 1), e), torch.ones(6, 1, dtype=torch.float64)
        assert_close_rel(experts(x, index, weights), frozen(x @ rotations[e], index, weights), torch.float64)


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_dropout_drops_blocks_of_each_expert_as_of_one_layer(method: str) -> None:
    """``int(p * D)`` identity blocks in one factor of every expert, and none outside training."""
    option = {"module_dropout": 0.5} if method == "oft" else {"boft_dropout": 0.5}
    model = orthoft.get_orthoft_model(make("hand_made"), config_for(method, ["block.up"], **option))
    perturb(model)
    layer = model.block
    rotations, b = layer._rotation_factors("default", training=True)
    eye = torch.eye(b, dtype=rotations.dtype)
    identity = (rotations == eye).flatten(-2).all(-1)  # (m, E * D)
    per_expert = identity.view(rotations.shape[0], layer.num_experts, -1)
    blocks = per_expert.shape[-1]
    assert per_expert.sum((0, 2)).tolist() == [blocks // 2] * layer.num_experts
    assert (per_expert.sum(2) > 0).sum(0).tolist() == [1] * layer.num_experts  # one factor per expert
    assert not (layer._rotation_factors("default", training=False)[0] == eye).flatten(-2).all(-1).any()


def test_coft_projects_each_expert_s_blocks_as_one_layer_s() -> None:
    """COFT's radius ``eps / sqrt(r)`` counts one expert's ``r`` blocks, as for a Linear layer."""
    config = config_for("oft", ["block.up"], oft_block_size=4, coft=True, eps=0.1)
    model = orthoft.get_orthoft_model(make("hand_made"), config)
    perturb(model)
    run(model, "hand_made")
    layer = model.block
    r = layer.adapter_options["default"].r
    norms = 2**0.5 * layer.oft_R["default"].weight.detach().norm(dim=-1)
    assert norms.shape[0] == layer.num_experts * r
    torch.testing.assert_close(norms, torch.full_like(norms, 0.1 / r**0.5))


# ---------------------------------------------------------------------------------------------
# Training, adapters on disk, several adapters


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_training_changes_only_the_adapter_tensors(method: str) -> None:
    model = orthoft.get_orthoft_model(make("qwen3_moe", torch.float32), config_for(method, EXPERT_PARAMETERS))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name in before if "oft_R" in name or "boft_" in name}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    ids = inputs("qwen3_moe")["input_ids"]
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed == trainable


def _peft_parameter_paths(base: nn.Module, targets: list[str]) -> dict[str, str]:
    """Module path -> parameter of every PEFT LoRA parameter wrapper for the same ``target_parameters``."""
    config = peft.LoraConfig(target_modules=[], target_parameters=targets, r=2)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module.parameter_name
        for name, module in peft_model.named_modules()
        if type(module).__name__ == "ParamWrapper"
    }


@pytest.mark.parametrize("method", ["oft", "boft"])
@pytest.mark.parametrize("model_name", ["qwen3_moe", "gpt_oss", "hand_made"])
def test_save_and_load_round_trip_with_peft_s_keys(tmp_path: Path, model_name: str, method: str) -> None:
    base = make(model_name)
    targets = MODELS[model_name].targets
    model = orthoft.get_orthoft_model(copy.deepcopy(base), config_for(method, targets))
    perturb(model)
    orthoft.save_adapter(model, tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    suffixes = ("oft_R.weight",) if method == "oft" else ("boft_R", "boft_s")
    paths = {
        key.removeprefix("base_model.model.").rsplit(".", 2 if method == "oft" else 1)[0] for key in saved
    }
    assert len(saved) == len(paths) * len(suffixes)
    # The same module paths, nesting and parameters as PEFT's LoRA on these parameters.
    ours = {path: layer.parameter_name for path, layer in named_orthoft_layers(model)}
    assert ours == _peft_parameter_paths(base, targets)
    assert set(ours) == paths
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_parameters"] == targets

    expected = run(model, model_name)
    for low_cpu_mem_usage in (False, True):
        loaded = orthoft.load_adapter(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert torch.equal(run(loaded, model_name), expected)
        for key, value in adapter_state_dict(loaded).items():
            assert torch.equal(value, saved[key])


def test_low_cpu_mem_usage_creates_no_values_and_says_so() -> None:
    model = orthoft.get_orthoft_model(
        make("hand_made"), config_for("oft", ["block.up"]), low_cpu_mem_usage=True
    )
    assert all(p.is_meta for name, p in model.named_parameters() if "oft_R" in name)
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True and holds no values yet"):
        run(model, "hand_made")


def test_several_adapters_switch_compose_and_delete() -> None:
    base = make("qwen3_moe")
    model = orthoft.get_orthoft_model(copy.deepcopy(base), config_for("oft", EXPERT_PARAMETERS), "first")
    orthoft.get_orthoft_model(model, config_for("oft_exact_shared", EXPERT_PARAMETERS), "second")
    perturb(model)
    assert len(named_orthoft_layers(model)) == 4  # one wrapper per parameter, holding both adapters
    assert_close_rel(
        run(model, "qwen3_moe"), run(hand_built_model(base, model, ["first"]), "qwen3_moe"), torch.float64
    )
    orthoft.set_adapter(model, "second")
    assert_close_rel(
        run(model, "qwen3_moe"), run(hand_built_model(base, model, ["second"]), "qwen3_moe"), torch.float64
    )
    orthoft.set_adapter(model, ["first", "second"])
    both = run(hand_built_model(base, model, ["first", "second"]), "qwen3_moe")
    assert_close_rel(run(model, "qwen3_moe"), both, torch.float64)
    with orthoft.disable_adapters(model):
        assert torch.equal(run(model, "qwen3_moe"), run(base, "qwen3_moe"))

    orthoft.delete_adapter(model, "first")
    assert all(layer.adapter_names == ["second"] for _, layer in named_orthoft_layers(model))
    assert_close_rel(
        run(model, "qwen3_moe"), run(hand_built_model(base, model, ["second"]), "qwen3_moe"), torch.float64
    )
    orthoft.delete_adapter(model, "second")
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert torch.equal(run(model, "qwen3_moe"), run(base, "qwen3_moe"))


def test_parameters_and_modules_together() -> None:
    base = make("qwen3_moe")
    config = config_for("oft", ["mlp.experts.down_proj"], target_modules=["q_proj"])
    model = orthoft.get_orthoft_model(copy.deepcopy(base), config)
    kinds = {type(layer).__name__ for _, layer in named_orthoft_layers(model)}
    assert kinds == {"OFTLinear", "OFTParameter"}
    merged = orthoft.merge_and_unload(model)
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]


def test_a_parameter_wrapped_by_hand() -> None:
    """``from_parameter`` on a module of one's own, as ``from_module`` on a layer; merging writes ``W'``."""
    module = hand_made().block.double()
    frozen = copy.deepcopy(module)
    layer = orthoft.BOFTParameter.from_parameter(
        module, "up", block_size=4, n_butterfly_factor=2, init_weights=False
    )
    assert layer.get_base_layer() is module and layer.num_experts == 3 and layer.in_features == 16
    x = inputs("hand_made")["x"]
    with torch.no_grad():
        frozen.up.copy_(hand_merged(layer, frozen.up, ["default"], transposed=False))
    assert_close_rel(layer(x), frozen(x), torch.float64)
    delta = layer.get_delta_weight()
    layer.merge()
    assert_close_rel(module.up, frozen.up, torch.float64)
    assert_close_rel(module.up - delta, layer._unmerged_weight, torch.float64)
    with pytest.raises(TypeError, match=r"use BOFTParameter\.from_parameter"):
        orthoft.BOFTParameter.from_module(module)
    # A copy merges into its own parameter only.
    copied = copy.deepcopy(layer)
    copied.unmerge()
    assert_close_rel(module.up, frozen.up, torch.float64)
    assert not torch.equal(copied.get_base_layer().up, module.up)


@pytest.mark.parametrize(
    "selection", [{"layers_to_transform": [1]}, {"exclude_modules": ["model.layers.0.mlp.experts"]}]
)
def test_layers_and_exclusions_select_the_modules_holding_parameters(selection: dict[str, Any]) -> None:
    model = orthoft.get_orthoft_model(make("qwen3_moe"), config_for("oft", EXPERT_PARAMETERS, **selection))
    paths = [path for path, _ in named_orthoft_layers(model)]
    assert paths == ["model.layers.1.mlp.experts", "model.layers.1.mlp.experts.base_layer"]


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the parameter and what is valid; the model is unchanged


def _snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("targets", "options", "match"),
    [
        (["block.scale"], {}, r"'block.scale' of shape \(12,\).*1-D, not 2-D \(out, in\) or 3-D.*'block.up'"),
        (["block.steps"], {}, r"'block.steps'.*torch.int64, not a floating dtype"),
        (["block.up", "block.gate"], {}, r"\['block.gate'\] match no parameter.*'block.up', 'block.proj'"),
        (
            ["block.up"],
            {"oft_block_size": 5},
            r"'block.up'.*block_size=5 is invalid.*16.*valid block_size values",
        ),
        (["up"], {"oft_block_size": 3}, r"OFTParameter 'block.up'.*block_size=3"),
    ],
)
def test_bad_targets_name_the_parameter_and_change_nothing(
    targets: list[str], options: dict, match: str
) -> None:
    model = make("hand_made")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        orthoft.get_orthoft_model(model, config_for("oft", targets, **options))
    after = _snapshot(model)
    assert after[0] == before[0] and all(torch.equal(after[1][k], v) for k, v in before[1].items())
    assert "_orthoft_state" not in model.__dict__


def test_bad_configs_and_combinations() -> None:
    with pytest.raises(ValueError, match="`target_parameters` must be a list of parameter names"):
        OFTConfig(target_parameters="mlp.experts.gate_up_proj")
    model = make("qwen3_moe")
    with pytest.raises(ValueError, match=r"match target_modules and hold parameters"):
        orthoft.get_orthoft_model(model, config_for("oft", ["q_proj.weight"], target_modules=["q_proj"]))
    orthoft.get_orthoft_model(model, config_for("oft", EXPERT_PARAMETERS), "first")
    with pytest.raises(ValueError, match="must all target the same parameters"):
        orthoft.get_orthoft_model(model, config_for("oft", EXPERT_PARAMETERS[:1]), "second")
    with pytest.raises(ValueError, match="holds OFT adapters"):
        orthoft.get_orthoft_model(model, config_for("boft", EXPERT_PARAMETERS), "second")
    assert orthoft.active_adapters(model) == ["first"]
    assert all(layer.adapter_names == ["first"] for _, layer in named_orthoft_layers(model))


# ---------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_on_device(device: str, method: str) -> None:
    """Forward and backward where the model lives, against the same model on the CPU."""
    cpu = orthoft.get_orthoft_model(
        make("hand_made", torch.float32), config_for(method, ["block.up", "block.proj"])
    )
    perturb(cpu)
    moved = copy.deepcopy(cpu).to(device)
    x = inputs("hand_made", torch.float32)["x"]
    expected, out = cpu(x), moved(x.to(device))
    assert_close_rel(out.cpu(), expected, torch.float32)
    expected.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(cpu.named_parameters(), moved.parameters(), strict=True):
        if p.requires_grad:
            assert_close_rel(q.grad.cpu(), p.grad, torch.float32), name
