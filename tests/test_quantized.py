"""OFT and BOFT on quantized linear layers (QOFT) of bitsandbytes, torchao and HQQ, against PEFT.

Each backend's tests skip when its package is missing. The layers are the libraries' own, quantized
on CPU from a random ``nn.Linear``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft import BOFTConfig as PeftBOFTConfig
from peft import OFTConfig as PeftOFTConfig
from peft.tuners.boft import layer as peft_boft
from peft.tuners.oft import layer as peft_oft
from torch import nn

import orthoft
from orthoft.layers import BOFTLinear, OFTLinear, OrthoftLayer

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

IN, OUT = 64, 96  # bitsandbytes' CPU inference packing needs out_features % 32 == 0
BACKENDS = ["bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8", "torchao-int4", "hqq-4bit"]


def quantize(backend: str, linear: nn.Linear) -> tuple[nn.Module, dict[str, Any]]:
    """The backend's quantized copy of ``linear`` and the keyword arguments PEFT's layers need for it."""
    if backend.startswith("bnb-"):
        bnb = pytest.importorskip("bitsandbytes")
        sizes = (linear.in_features, linear.out_features)
        if backend == "bnb-int8":
            layer = bnb.nn.Linear8bitLt(*sizes, has_fp16_weights=False)
        else:
            quant_type = backend.removeprefix("bnb-")
            layer = bnb.nn.Linear4bit(*sizes, compute_dtype=torch.float32, quant_type=quant_type)
        layer.load_state_dict(linear.state_dict())
        return layer.to("cpu"), {}  # quantizes
    if backend.startswith("torchao-"):
        pytest.importorskip("torchao")
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_

        # torchao 0.18's Int4WeightOnlyConfig needs CUDA (or mslk); int4 weight-only on CPU is the intx form.
        config: Callable[[], Any] = (
            Int8WeightOnlyConfig
            if backend == "torchao-int8"
            else lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        )
        layer = copy.deepcopy(linear)
        quantize_(layer, config())
        return layer, {"get_apply_tensor_subclass": config}
    hqq = pytest.importorskip("hqq.core.quantize")
    settings = hqq.BaseQuantizeConfig(nbits=4, group_size=32)
    return hqq.HQQLinear(copy.deepcopy(linear), settings, compute_dtype=torch.float32, device="cpu"), {}


def storage(layer: nn.Module) -> list[torch.Tensor]:
    """Copies of the tensors that hold the quantized weight."""
    if hasattr(layer, "W_q"):  # HQQ
        return [layer.W_q.detach().clone(), layer.meta["scale"].clone(), layer.meta["zero"].clone()]
    weight = layer.weight
    if hasattr(weight, "qdata"):  # torchao
        return [weight.qdata.clone(), weight.scale.clone()]
    if weight.data.dtype == torch.int8:  # bitsandbytes 8-bit: row scales move to the state at first forward
        scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
        return [weight.data.clone(), scales.clone()]
    return [weight.data.clone()]


def same_storage(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def adapted(backend: str, method: str, seed: int = 0) -> tuple[nn.Linear, OrthoftLayer, nn.Module]:
    """A float linear, orthoft's layer on its quantized copy, and PEFT's layer on the same quantized layer,
    with the same random adapter tensors."""
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT)
    base, peft_kwargs = quantize(backend, linear)
    if method == "oft":
        config = PeftOFTConfig(oft_block_size=8, r=0, init_weights=False)
        peft_layer = peft_oft.Linear(base, "default", config=config, r=0, **peft_kwargs)
        with torch.no_grad():
            peft_layer.oft_R["default"].weight.normal_(0.0, 0.2)
        layer: OrthoftLayer = OFTLinear.from_module(base, block_size=8)
    else:
        config = PeftBOFTConfig(boft_block_size=8, init_weights=False)
        peft_layer = peft_boft.Linear(base, "default", config=config, **peft_kwargs)
        layer = BOFTLinear.from_module(base, block_size=8)
    tensors = {k: v for k, v in peft_layer.state_dict().items() if not k.startswith("base_layer.")}
    assert set(tensors) == {k for k in layer.state_dict() if not k.startswith("base_layer.")}
    layer.load_state_dict(tensors, strict=False)
    return linear, layer, peft_layer


@pytest.mark.parametrize("method", ["oft", "boft"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_function_and_gradients_as_peft(backend: str, method: str) -> None:
    _, layer, peft_layer = adapted(backend, method)
    x = torch.randn(2, 5, IN)
    out, peft_out = layer(x), peft_layer(x)
    # Both run the same quantized matmul on the same rotated input: float32 rounding apart.
    assert rel_err(out, peft_out) < 1e-5
    out.square().sum().backward()
    peft_out.square().sum().backward()
    peft_parameters = dict(peft_layer.named_parameters())
    trained = [(name, p) for name, p in layer.named_parameters() if p.requires_grad]
    assert trained
    for name, p in trained:
        # Gradients reach the adapters through the quantized forward, as PEFT's do.
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert rel_err(p.grad, peft_parameters[name].grad) < 1e-4, name


@pytest.mark.parametrize("method", ["oft", "boft"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_changes_only_adapters(backend: str, method: str) -> None:
    _, layer, _ = adapted(backend, method)
    base = layer.base_layer
    before = storage(base)
    # The quantized weight is compared through its storage; the other frozen tensors (bias) directly.
    frozen = {
        name: p.detach().clone()
        for name, p in layer.named_parameters()
        if not p.requires_grad and type(p.data) is torch.Tensor
    }
    trainable = {name: p.detach().clone() for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("oft_R.", "boft_")) for name in trainable)
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(8, IN), torch.randn(8, OUT)
    for _ in range(3):
        optimizer.zero_grad()
        (layer(x) - target).square().mean().backward()
        optimizer.step()
    assert same_storage(before, storage(layer.base_layer))
    assert layer.base_layer is base
    for name, p in layer.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        elif name in trainable:
            assert not torch.equal(p, trainable[name]), name


@pytest.mark.parametrize("method", ["oft", "boft"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_requantizes_and_unmerge_restores(backend: str, method: str) -> None:
    linear, layer, _ = adapted(backend, method)
    base_type = type(layer.base_layer)
    layer.eval()
    x = torch.randn(16, IN)
    with torch.no_grad():
        quantization_err = rel_err(layer.base_layer(x), linear(x))
        unmerged = layer(x)
        # After the first inference forward: bitsandbytes repacks 4-bit storage for its CPU kernel then.
        before = storage(layer.base_layer)
        layer.merge(safe_merge=True)
        merged = layer(x)
        assert type(layer.base_layer) is base_type and layer.merged
        merge_err = rel_err(merged, unmerged)
        print(f"{backend} {method}: merge error {merge_err:.2e}, quantization error {quantization_err:.2e}")
        # Requantizing the rotated weight costs about what quantizing the weight did.
        assert 0 < merge_err < 2 * quantization_err
        layer.unmerge()
        assert same_storage(before, storage(layer.base_layer))
        assert torch.equal(layer(x), unmerged)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_and_unload_gives_quantized_layers(backend: str) -> None:
    torch.manual_seed(3)
    linears = [nn.Linear(IN, OUT) for _ in range(2)]
    model = nn.Sequential()
    model.add_module("up", quantize(backend, linears[0])[0])
    model.add_module("act", nn.ReLU())
    model.add_module("down", quantize(backend, nn.Linear(OUT, IN))[0])
    base_types = [type(model.up), type(model.down)]
    orthoft.get_orthoft_model(model, orthoft.BOFTConfig(target_modules=["up", "down"], boft_block_size=8))
    assert isinstance(model.up, BOFTLinear) and isinstance(model.down, BOFTLinear)
    orthoft.merge_and_unload(model)
    assert [type(model.up), type(model.down)] == base_types
    model(torch.randn(3, IN))


def test_unknown_layer_type_lists_supported_kinds() -> None:
    class Projection(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential()
    model.add_module("proj", Projection())
    with pytest.raises(TypeError, match=r"supported are .*bitsandbytes Linear4bit.*HQQ HQQLinear"):
        orthoft.get_orthoft_model(model, orthoft.OFTConfig(target_modules=["proj"], oft_block_size=4))
    with pytest.raises(TypeError, match=r"torchao-quantized nn.Linear"):
        OFTLinear.from_module(Projection(), block_size=4)


class _ForwardOnlyLinear(nn.Module):
    """Stands in for a GPTQ/AWQ/AQLM/EETQ layer: a packed weight and a forward, nothing to dequantize."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8))
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.qweight.to(x.dtype).T * 0.01 + self.bias


def test_forward_only_kind_adapts_and_refuses_to_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    # EETQ runs on CUDA only: its class is matched by package and name, so a stand-in module shows the path.
    package = types.ModuleType("eetq")
    eetq_linear = type("EetqLinear", (_ForwardOnlyLinear,), {"__module__": "eetq"})
    package.EetqLinear = eetq_linear
    monkeypatch.setitem(sys.modules, "eetq", package)
    torch.manual_seed(4)
    model = nn.Sequential()
    model.add_module("proj", eetq_linear(16, 8))
    orthoft.get_orthoft_model(
        model, orthoft.BOFTConfig(target_modules=["proj"], boft_block_size=4, init_weights=False)
    )
    assert model.proj.base_kind.name == "EETQ"
    x = torch.randn(3, 16)
    out = model(x)
    rotation, scale = model.proj.get_rotation(), model.proj.boft_s["default"].reshape(-1)
    base = model.proj.base_layer
    torch.testing.assert_close(out, (base(x @ rotation) - base.bias) * scale + base.bias)
    out.sum().backward()
    assert model.proj.boft_R["default"].grad is not None
    with pytest.raises(TypeError, match="EETQ layers support only the forward pass"):
        model.proj.merge()
    with pytest.raises(TypeError, match="cannot merge into a EETQ layer"):
        orthoft.merge_and_unload(model)
    assert isinstance(model.proj, BOFTLinear) and not model.proj.merged


@pytest.mark.parametrize("backend", ["torchao-int8", "torchao-int4"])
def test_torchao_requantizes_with_the_layers_own_settings(backend: str) -> None:
    from orthoft.layers.quantized import _TORCHAO_REQUANTIZE

    torch.manual_seed(5)
    linear = nn.Linear(IN, OUT)
    weight = quantize(backend, linear)[0].weight
    again = _TORCHAO_REQUANTIZE[type(weight).__name__](weight, linear.weight.detach())
    assert type(again) is type(weight)
    assert torch.equal(again.qdata, weight.qdata) and torch.equal(again.scale, weight.scale)


def test_orthoft_imports_without_quantization_packages() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"bitsandbytes", "torchao", "hqq", "gptqmodel", "awq", "aqlm", "eetq"}:
            raise ImportError(name)
sys.meta_path.insert(0, Block())
import torch, orthoft
layer = orthoft.OFTLinear(8, 4, block_size=4)
layer(torch.randn(2, 8))
assert not any(name.split(".")[0] in {"bitsandbytes", "torchao", "hqq"} for name in sys.modules)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
