"""A property-based test of ``load_adapter``: valid adapter directories, mutated at random (config fields of
the wrong type or value, unknown or missing fields, files that are not JSON or not UTF-8, missing, extra,
misshapen, non-finite or wrongly typed tensors, damaged safetensors files and headers, regexes that
backtrack), either load exactly or fail with a ``ValueError``, ``TypeError`` or ``OSError`` that names the
file, and leave the model as it was; every case within a time limit.

``ORTHOFT_FUZZ_CASES`` sets the number of cases (default 500, about 15 s, derandomized so CI sees
the same ones; set it to run that many random cases). The number that ran is printed after the tests.
Other producers of valid adapters (other file formats) are one entry each in ``PRODUCERS``, as are
producers of adapters that ``load_adapter`` must refuse, mutated or not (a LoRA adapter).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import shutil
import signal
import struct
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import orthoft
from orthoft.adapter_io import CONFIG_NAME, PEFT_KEY_PREFIX, WEIGHTS_NAME, adapter_state_dict, load_adapter

from fuzz_helpers import DTYPES, join_safetensors, json_values, split_safetensors, time_limit
from tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="the time limit needs setitimer")

CASES = int(os.environ.get("ORTHOFT_FUZZ_CASES", "500"))
RANDOM_CASES = "ORTHOFT_FUZZ_CASES" in os.environ
# A load takes milliseconds; a backtracking regex would take minutes.
CASE_TIME_LIMIT_S = 20.0


# ---------------------------------------------------------------------------------------------
# Valid adapters


def _trained(model: nn.Module) -> nn.Module:
    """Stand-in for training: every trainable tensor moved."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _orthoft_oft(base: nn.Module, directory: Path) -> None:
    config = orthoft.OFTConfig(target_modules=["q_proj", "v_proj"], oft_block_size=8, bias="oft_only")
    orthoft.save_adapter(_trained(orthoft.get_orthoft_model(copy.deepcopy(base), config)), directory)


def _orthoft_boft(base: nn.Module, directory: Path) -> None:
    config = orthoft.BOFTConfig(
        target_modules=["o_proj", "down_proj"],
        boft_block_size=4,
        boft_n_butterfly_factor=2,
        modules_to_save=["lm_head"],
    )
    orthoft.save_adapter(_trained(orthoft.get_orthoft_model(copy.deepcopy(base), config)), directory)


def _peft_oft(base: nn.Module, directory: Path) -> None:
    config = peft.OFTConfig(
        target_modules=["k_proj", "up_proj"], oft_block_size=8, use_cayley_neumann=False, init_weights=False
    )
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(directory)


def _orthoft_lora_export(base: nn.Module, directory: Path) -> None:
    config = orthoft.BOFTConfig(
        target_modules=["q_proj", "up_proj"], boft_block_size=4, boft_n_butterfly_factor=2
    )
    orthoft.save_as_lora(_trained(orthoft.get_orthoft_model(copy.deepcopy(base), config)), directory, rank=4)


@dataclass(frozen=True)
class Producer:
    """Writes an adapter for the base model into a directory: one ``load_adapter`` loads exactly, or
    (``loads=False``) one it must refuse however it is mutated, naming a file."""

    name: str
    write: Callable[[nn.Module, Path], None]
    loads: bool = True


PRODUCERS = [
    Producer("orthoft OFT, bias=oft_only", _orthoft_oft),
    Producer("orthoft BOFT, modules_to_save", _orthoft_boft),
    Producer("PEFT OFT, exact Cayley", _peft_oft),
    # A LoRA adapter (orthoft's export of a BOFT adapter): not something orthoft loads.
    Producer("orthoft's LoRA export", _orthoft_lora_export, loads=False),
]


# ---------------------------------------------------------------------------------------------
# Mutations: each says which file it damages


CONFIG_FIELDS = sorted(
    {field for config in (orthoft.OFTConfig(), orthoft.BOFTConfig()) for field in config.to_dict()}
    | {"task_type", "peft_version", "base_model_name_or_path", "inference_mode", "no_such_field"}
)
BACKTRACKING = [
    r"(.*)*x",
    r"(a+)+$",
    r"(\w+\.)+q_proj",
    r"(a|ab)*c",
    r".*.*.*.*.*x",
    r"(.*a){30}",
    r"(x+x+)+y",
]
REGEXES = [
    *BACKTRACKING,
    r".*\.(q_proj|v_proj)",
    r"model\.layers\.\d+\.self_attn\.k_proj",
    r"[",
    r"(?P<a",
    "q_proj",
]
CONFIG_VALUES = json_values(REGEXES)


def _read_json(directory: Path) -> Any:
    return json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))


def _write_json(directory: Path, data: Any) -> None:
    (directory / CONFIG_NAME).write_text(json.dumps(data), encoding="utf-8")


@dataclass(frozen=True)
class SetField:
    file = CONFIG_NAME
    field: str
    value: Any

    def apply(self, directory: Path) -> None:
        data = _read_json(directory)
        data[self.field] = self.value
        _write_json(directory, data)


@dataclass(frozen=True)
class DeleteField:
    file = CONFIG_NAME
    field: str

    def apply(self, directory: Path) -> None:
        data = _read_json(directory)
        data.pop(self.field, None)
        _write_json(directory, data)


@dataclass(frozen=True)
class ReplaceConfig:
    file = CONFIG_NAME
    value: Any

    def apply(self, directory: Path) -> None:
        _write_json(directory, self.value)


@dataclass(frozen=True)
class ConfigBytes:
    """Truncated, non-UTF-8, deeply nested, empty or missing ``adapter_config.json``."""

    file = CONFIG_NAME
    kind: str
    at: float

    def apply(self, directory: Path) -> None:
        path = directory / CONFIG_NAME
        raw = path.read_bytes()
        cut = int(self.at * len(raw))
        if self.kind == "truncate":
            path.write_bytes(raw[:cut])
        elif self.kind == "non-utf8":
            path.write_bytes(raw[:cut] + b"\xff\xc3(" + raw[cut:])
        elif self.kind == "deep":
            depth = 10 + int(self.at * 200_000)
            path.write_bytes(b"[" * depth + b"]" * depth)
        elif self.kind == "empty":
            path.write_bytes(b"")
        else:
            path.unlink()


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / WEIGHTS_NAME)


def _pick(tensors: dict[str, torch.Tensor], index: int) -> str:
    keys = sorted(tensors)
    return keys[index % len(keys)]


@dataclass(frozen=True)
class EditTensor:
    """One tensor dropped, renamed, misshapen, cast, made non-finite, or one added."""

    file = WEIGHTS_NAME
    kind: str
    index: int
    dtype_index: int
    at: float

    def apply(self, directory: Path) -> None:
        tensors = _tensors(directory)
        key = _pick(tensors, self.index)
        tensor = tensors[key]
        if self.kind == "drop":
            del tensors[key]
        elif self.kind == "extra":
            tensors[f"{key}.extra{self.index}"] = tensor.clone()
        elif self.kind == "rename":
            tensors[key.replace(".", "_", 1 + self.index % 3)] = tensors.pop(key)
        elif self.kind == "strip-prefix-all":  # orthoft's earlier layout: still valid
            tensors = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in tensors.items()}
        elif self.kind == "misshape":
            shapes = [(tensor.numel(),), (*tensor.shape, 1), (tensor.shape[0] + 1, *tensor.shape[1:]), ()]
            tensors[key] = torch.randn(shapes[self.dtype_index % len(shapes)])
        elif self.kind == "cast":
            tensors[key] = (tensor * 4).to(DTYPES[self.dtype_index % len(DTYPES)])
        else:  # non-finite
            tensor = tensor.clone()
            tensor.view(-1)[int(self.at * (tensor.numel() - 1))] = [
                float("nan"),
                float("inf"),
                -float("inf"),
            ][self.dtype_index % 3]
            tensors[key] = tensor
        save_file(tensors, directory / WEIGHTS_NAME)


@dataclass(frozen=True)
class WeightBytes:
    """A safetensors file truncated, overwritten with garbage, with an absurd header size, an edited or
    replaced header, empty or missing."""

    file = WEIGHTS_NAME
    kind: str
    at: float
    data: bytes
    number: int
    value: Any

    def apply(self, directory: Path) -> None:
        path = directory / WEIGHTS_NAME
        raw = path.read_bytes()
        cut = int(self.at * len(raw))
        header, body = split_safetensors(raw)
        if self.kind == "truncate":
            raw = raw[:cut]
        elif self.kind == "garbage":
            raw = raw[:cut] + self.data + raw[cut + len(self.data) :]
        elif self.kind == "header-size":
            raw = struct.pack("<Q", self.number) + raw[8:]
        elif self.kind == "header-field":
            entries = json.loads(header)
            key = _pick({k: v for k, v in entries.items() if k != "__metadata__"}, self.number)
            entries[key][["dtype", "shape", "data_offsets"][self.number % 3]] = self.value
            edited = json.dumps(entries).encode()
            raw = join_safetensors(edited, body)
        elif self.kind == "header":
            replaced = json.dumps(self.value).encode()
            raw = join_safetensors(replaced, body)
        elif self.kind == "empty":
            raw = b""
        else:
            path.unlink()
            return
        path.write_bytes(raw)


fractions = st.floats(0.0, 1.0)
mutations = st.one_of(
    st.builds(SetField, st.sampled_from(CONFIG_FIELDS), CONFIG_VALUES),
    st.builds(SetField, st.sampled_from(["target_modules", "exclude_modules"]), st.sampled_from(REGEXES)),
    st.builds(DeleteField, st.sampled_from(CONFIG_FIELDS)),
    st.builds(ReplaceConfig, CONFIG_VALUES.filter(lambda value: not isinstance(value, dict))),
    st.builds(ConfigBytes, st.sampled_from(["truncate", "non-utf8", "deep", "empty", "missing"]), fractions),
    st.builds(
        EditTensor,
        st.sampled_from(["drop", "extra", "rename", "strip-prefix-all", "misshape", "cast", "non-finite"]),
        st.integers(0, 50),
        st.integers(0, 50),
        fractions,
    ),
    st.builds(
        WeightBytes,
        st.sampled_from(["truncate", "garbage", "header-size", "header-field", "header", "empty", "missing"]),
        fractions,
        st.binary(min_size=1, max_size=64),
        st.integers(0, 2**64 - 1),
        CONFIG_VALUES,
    ),
)


# ---------------------------------------------------------------------------------------------
# The property


def _as_loaded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under PEFT's keys (orthoft's earlier layout had no prefix)."""
    if tensors and all(key.startswith(PEFT_KEY_PREFIX) for key in tensors):
        return tensors
    return {PEFT_KEY_PREFIX + key: value for key, value in tensors.items()}


def assert_loaded_exactly(model: nn.Module, directory: Path, base_state: dict[str, torch.Tensor]) -> None:
    """Every tensor the adapter trains is the file's (in the model's dtype); the rest of the model is the
    base model's."""
    in_file = _as_loaded(load_file(directory / WEIGHTS_NAME))
    loaded = adapter_state_dict(model)
    for key, value in loaded.items():
        assert torch.equal(value, in_file[key].to(value.dtype)), key
    # The biases that bias="oft_only" trains are the base model's own; modules_to_save copies go with unload.
    biases = {
        key.removeprefix(PEFT_KEY_PREFIX).replace(".base_layer.", "."): key
        for key in loaded
        if ".base_layer." in key
    }
    orthoft.unload(model)
    state = model.state_dict()
    assert state.keys() == base_state.keys()
    for key, value in base_state.items():
        expected = in_file[biases[key]].to(value.dtype) if key in biases else value
        assert torch.equal(state[key], expected), key


def assert_unchanged(model: nn.Module, base_state: dict[str, torch.Tensor], base_types: list[type]) -> None:
    state = model.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[key], value) for key, value in base_state.items())
    assert [type(module) for module in model.modules()] == base_types
    assert "_orthoft_state" not in model.__dict__


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama(attention_bias=True)


@pytest.fixture(scope="module")
def templates(base: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directories = []
    for index, producer in enumerate(PRODUCERS):
        directory = tmp_path_factory.mktemp(f"producer{index}")
        producer.write(base, directory)
        directories.append(directory)
    return directories


def test_every_producer_writes_an_adapter_that_loads_exactly(base: nn.Module, templates: list[Path]) -> None:
    state = {key: value.clone() for key, value in base.state_dict().items()}
    for producer, directory in zip(PRODUCERS, templates, strict=True):
        if producer.loads:
            model = copy.deepcopy(base)
            load_adapter(model, directory)
            assert_loaded_exactly(model, directory, state)


def test_a_lora_adapter_is_refused_saying_what_it_is_and_what_loads(
    base: nn.Module, templates: list[Path]
) -> None:
    state = {key: value.clone() for key, value in base.state_dict().items()}
    types = [type(module) for module in base.modules()]
    for producer, directory in zip(PRODUCERS, templates, strict=True):
        if not producer.loads:
            assert _read_json(directory)["peft_type"] == "LORA"
            assert any("lora_A" in key for key in _tensors(directory))
            model = copy.deepcopy(base)
            message = (
                rf"{CONFIG_NAME}: `peft_type` is 'LORA': this is a LoRA adapter .* orthoft loads OFT and BOFT"
            )
            with pytest.raises(ValueError, match=message):
                load_adapter(model, directory)
            assert_unchanged(model, state, types)


def test_mutated_adapters_load_exactly_or_fail_cleanly(
    base: nn.Module, templates: list[Path], summary_line: Callable[[str], None]
) -> None:
    base_state = {key: value.clone() for key, value in base.state_dict().items()}
    base_types = [type(module) for module in base.modules()]
    tally: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=not RANDOM_CASES,
        suppress_health_check=list(HealthCheck),
    )
    @given(producer=st.integers(0, len(PRODUCERS) - 1), mutation=mutations)
    def case(producer: int, mutation: Any) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            directory = Path(scratch) / "adapter"
            shutil.copytree(templates[producer], directory)
            mutation.apply(directory)
            kinds[type(mutation).__name__ + (f" {mutation.kind}" if hasattr(mutation, "kind") else "")] += 1
            model = copy.deepcopy(base)
            with time_limit(CASE_TIME_LIMIT_S), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    load_adapter(model, directory)
                except (ValueError, TypeError, OSError) as error:
                    # A damaged config can make the files disagree: naming either file is clear.
                    message = str(error)
                    assert CONFIG_NAME in message or WEIGHTS_NAME in message, f"names no file: {error!r}"
                    assert_unchanged(model, base_state, base_types)
                    tally[type(error).__name__ if not isinstance(error, OSError) else "OSError"] += 1
                    return
            assert PRODUCERS[producer].loads, f"loaded an adapter from {PRODUCERS[producer].name}"
            assert_loaded_exactly(model, directory, base_state)
            tally["loaded"] += 1

    case()
    total = sum(tally.values())
    assert total >= min(CASES, 50)
    refused = ", ".join(f"{name} {count}" for name, count in sorted(tally.items()) if name != "loaded")
    summary_line(
        f"adapter fuzzer: {total} mutated adapters from {len(PRODUCERS)} producers in "
        f"{time.perf_counter() - start:.1f} s: {tally['loaded']} loaded exactly, refused cleanly: {refused}"
    )
    summary_line(
        "adapter fuzzer mutations: " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
    )
