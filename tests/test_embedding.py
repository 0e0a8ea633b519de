"""OFT and BOFT on ``nn.Embedding`` outputs: ``y = E[ids] @ R`` (times ``s`` for BOFT).

OFT is compared with PEFT's OFT ``Embedding``. PEFT has no BOFT Embedding: BOFT is compared with PEFT's
BOFT Linear on an identity weight, which computes ``(x @ R) * s`` for the same ``boft_R``/``boft_s``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import BOFTConfig as PeftBOFTConfig
from peft import OFTConfig as PeftOFTConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.boft import layer as peft_boft
from peft.tuners.oft import layer as peft_oft
from torch import nn

import orthoft
from orthoft.adapter_io import adapter_state_dict
from orthoft.layers import BOFTEmbedding, OFTEmbedding

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def embedding(seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(50, 32, padding_idx=0, dtype=torch.float64)


@pytest.mark.parametrize(
    "options",
    [
        {"oft_block_size": 8, "use_cayley_neumann": False},
        {"oft_block_size": 8, "num_cayley_neumann_terms": 5},
        {"oft_block_size": 4, "block_share": True},
    ],
)
def test_oft_embedding_matches_peft(options: dict[str, object]) -> None:
    base = embedding()
    config = PeftOFTConfig(r=0, init_weights=False, **options)
    peft_layer = peft_oft.Embedding(copy.deepcopy(base), "default", config=config, r=0)
    layer = OFTEmbedding.from_module(
        base,
        block_size=config.oft_block_size,
        block_share=config.block_share,
        use_cayley_neumann=config.use_cayley_neumann,
        num_cayley_neumann_terms=config.num_cayley_neumann_terms,
    )
    peft_tensors = {k: v for k, v in peft_layer.state_dict().items() if not k.startswith("base_layer.")}
    assert set(peft_tensors) == {"oft_embedding_R.default.weight"}
    assert set(layer.adapter_state_dict("default")) == {"oft_embedding_R.weight"}
    layer.load_state_dict(peft_tensors, strict=False)
    ids = torch.randint(0, 50, (4, 7))
    out = layer(ids)
    torch.testing.assert_close(out, peft_layer(ids))
    torch.testing.assert_close(out[ids == 0], torch.zeros_like(out[ids == 0]))

    original = base.weight.detach().clone()
    peft_layer.merge()
    layer.merge(safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight)
    torch.testing.assert_close(layer(ids), out)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_boft_embedding_matches_boft_on_an_identity_linear() -> None:
    base = embedding(1)
    dim = base.embedding_dim
    identity = nn.Linear(dim, dim, bias=False, dtype=torch.float64)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(dim))
    peft_layer = peft_boft.Linear(
        identity, "default", config=PeftBOFTConfig(boft_block_size=4, init_weights=False)
    )
    layer = BOFTEmbedding.from_module(base, block_size=4, init_weights=False)
    assert layer.boft_s["default"].shape == (1, dim)
    with torch.no_grad():
        layer.boft_R["default"].copy_(peft_layer.boft_R["default"])
        layer.boft_s["default"].copy_(peft_layer.boft_s["default"].reshape(1, dim))
    ids = torch.randint(0, 50, (3, 9))
    out = layer(ids)
    torch.testing.assert_close(out, peft_layer(base(ids)))

    original = base.weight.detach().clone()
    layer.merge()
    # The hand-built merged table: each row rotated and scaled as an output is.
    torch.testing.assert_close(layer.base_layer.weight, peft_layer(original))
    torch.testing.assert_close(layer(ids), out)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


@pytest.mark.parametrize("cls", [OFTEmbedding, BOFTEmbedding])
def test_embedding_training_and_adapter_order(cls: type) -> None:
    torch.manual_seed(2)
    layer = cls(40, 16, block_size=4, init_weights=False)
    layer.add_adapter("second", block_size=8, init_weights=False)
    layer.set_adapter(["default", "second"])
    ids = torch.randint(0, 40, (5, 6))
    out = layer(ids)
    # Each adapter in turn acts on the outputs: E[ids] @ R_1 (* s_1) @ R_2 (* s_2).
    expected = layer.base_layer(ids)
    for name in ["default", "second"]:
        expected = expected @ layer.get_rotation(name)
        expected = expected * layer.boft_s[name] if cls is BOFTEmbedding else expected
    torch.testing.assert_close(out, expected)
    if cls is OFTEmbedding:
        torch.testing.assert_close(out, layer.base_layer(ids) @ layer.get_rotation())
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.merge(adapter_names=["default"])
        layer.merge(adapter_names=["second"])
        torch.testing.assert_close(layer(ids), out, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)

    layer.set_adapter("default")
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        layer(ids).square().mean().backward()
        optimizer.step()
    assert not layer.base_layer.weight.requires_grad
    assert torch.equal(layer.base_layer.weight, original)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.head = nn.Linear(16, 30)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_model_adapter_round_trips_through_peft(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = _Tiny()
    base = copy.deepcopy(model)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        PeftOFTConfig(target_modules=["embed", "head"], oft_block_size=4, r=0, init_weights=False),
    )
    config = orthoft.OFTConfig(target_modules=["embed", "head"], oft_block_size=4, init_weights=False)
    orthoft.get_orthoft_model(model, config)
    assert isinstance(model.embed, OFTEmbedding)
    ours = adapter_state_dict(model)
    prefix = "base_model.model."
    assert set(ours) == {f"{prefix}embed.oft_embedding_R.weight", f"{prefix}head.oft_R.weight"}
    # PEFT's saved keys are orthoft's.
    assert set(get_peft_model_state_dict(peft_model)) == set(ours)
    set_peft_model_state_dict(peft_model, ours)
    ids = torch.randint(0, 30, (2, 8))
    out = model(ids)
    torch.testing.assert_close(peft_model(ids), out)
    # The files too: PEFT loads what orthoft saves.
    orthoft.save_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(ids), out)
    merged = orthoft.merge_and_unload(model)
    assert type(merged.embed) is nn.Embedding
    torch.testing.assert_close(merged(ids), out, rtol=1e-5, atol=1e-5)


def test_quantized_embeddings_are_not_taken_for_plain_ones() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    with pytest.raises(TypeError, match=r"supported base layers: torch\.nn\.Embedding"):
        OFTEmbedding.from_module(bnb.nn.Embedding8bit(10, 8), block_size=4)
