"""A property-based test of ``load_adapter`` on LyCORIS and kohya files: valid single-file adapters (orthoft's
diag-OFT and BOFT, a kohya-named one, two that LyCORIS itself saved), mutated at random (truncated or
garbage bytes, absurd header sizes, damaged header JSON, edited metadata, dropped, extra or renamed
keys, misshapen, wrongly typed or non-finite tensors, a missing or odd ``alpha``, keys of other LyCORIS
algorithms, names matching no module), either load exactly or fail with a ``ValueError``, ``TypeError``
or ``OSError`` that names the file, and leave the model as it was (state dict and module types); every
case within a time limit.

``ORTHOFT_FUZZ_CASES`` sets the number of cases (default 400, about 10 s, derandomized so CI sees the
same ones; set it to run that many random cases). The counts per outcome are printed after the tests.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import orthoft
from orthoft.tuner import named_orthoft_layers

from fuzz_helpers import (
    DTYPES,
    CaseTimeout,
    header_entries,
    join_safetensors,
    json_values,
    split_safetensors,
    time_limit,
)
from lycoris_helpers import SmallNet, lycoris_trained, quiet_lycoris, small_inputs

lycoris = pytest.importorskip("lycoris")

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="the time limit needs setitimer")

CASES = int(os.environ.get("ORTHOFT_FUZZ_CASES", "400"))
RANDOM_CASES = "ORTHOFT_FUZZ_CASES" in os.environ
# A load takes milliseconds; anything near this is a hang.
CASE_TIME_LIMIT_S = 20.0
FILE_NAME = "adapter.safetensors"
# The adaptable modules of SmallNet: fc1 (Linear 12 -> 32), conv (Conv2d 3 -> 16), fc2 (Linear 32 -> 16).
MODULES = ("fc1", "conv", "fc2")


# ---------------------------------------------------------------------------------------------
# Valid files


def _orthoft_file(base: nn.Module, path: Path, file_format: str, **options: Any) -> None:
    config = orthoft.LycorisConfig(target_modules=list(MODULES), block_size=4, init_weights=False, **options)
    orthoft.save_adapter(orthoft.get_orthoft_model(copy.deepcopy(base), config), path, format=file_format)


def _orthoft_diag_oft(base: nn.Module, path: Path) -> None:
    _orthoft_file(base, path, "lycoris", algo="diag-oft", constraint=0.01, rescaled=True)


def _orthoft_boft(base: nn.Module, path: Path) -> None:
    _orthoft_file(base, path, "lycoris", algo="boft")


def _orthoft_kohya(base: nn.Module, path: Path) -> None:
    # BOFT on the linear layers, diag-OFT on the convolution: one file, two algorithms.
    overrides = {"conv": {"algo": "diag-oft"}}
    _orthoft_file(base, path, "kohya", algo="boft", rescaled=True, layer_overrides=overrides)


def _lycoris_saved(base: nn.Module, path: Path, **options: Any) -> None:
    x, image = small_inputs()
    _, network = lycoris_trained(base, lambda model: model(x, image), linear_dim=4, **options)
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})


def _lycoris_diag_oft(base: nn.Module, path: Path) -> None:
    _lycoris_saved(base, path, algo="diag-oft", constraint=1e-3, rescaled=True)


def _lycoris_boft(base: nn.Module, path: Path) -> None:
    _lycoris_saved(base, path, algo="boft")


@dataclass(frozen=True)
class Producer:
    """Writes a valid file for the base model; its module names are ``<prefix>_<module path>``."""

    name: str
    prefix: str
    write: Callable[[nn.Module, Path], None]


PRODUCERS = [
    Producer("orthoft diag-OFT, rescaled, constraint", "lycoris", _orthoft_diag_oft),
    Producer("orthoft BOFT", "lycoris", _orthoft_boft),
    Producer("orthoft kohya, BOFT and diag-OFT", "lora_te", _orthoft_kohya),
    Producer("LyCORIS diag-OFT, rescaled, constraint", "lycoris", _lycoris_diag_oft),
    Producer("LyCORIS BOFT", "lycoris", _lycoris_boft),
]


# ---------------------------------------------------------------------------------------------
# Mutations of the one file

# Strings a header or metadata edit may write: dtype names, LyCORIS's metadata, another algorithm's config.
HEADER_STRINGS = ["F32", "F16", "I64", "BOOL", "F8_E4M3", "lycoris.kohya", '{"algo": "lokr"}']
HEADER_VALUES = json_values(HEADER_STRINGS)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def _module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({key.partition(".")[0] for key in tensors})


def _pick(keys: Any, index: int) -> str:
    ordered = sorted(keys)
    return ordered[index % len(ordered)]


def _nonfinite(index: int) -> float:
    return [math.nan, math.inf, -math.inf][index % 3]


@dataclass(frozen=True)
class FileBytes:
    """The file truncated, overwritten with garbage, with an absurd header size, its header JSON cut,
    spliced with bytes or replaced, a header field edited, empty or missing."""

    kind: str
    at: float
    data: bytes
    number: int
    value: Any

    def apply(self, path: Path, prefix: str) -> None:
        raw = path.read_bytes()
        header, body = split_safetensors(raw)
        cut = int(self.at * len(raw))
        spot = int(self.at * len(header))
        if self.kind == "truncate":
            raw = raw[:cut]
        elif self.kind == "garbage":
            raw = raw[:cut] + self.data + raw[cut + len(self.data) :]
        elif self.kind == "header-size":
            raw = self.number.to_bytes(8, "little") + raw[8:]
        elif self.kind == "header-cut":
            raw = join_safetensors(header[:spot], body)
        elif self.kind == "header-splice":  # JSON damage, non-UTF-8 bytes among them
            raw = join_safetensors(header[:spot] + self.data + header[spot:], body)
        elif self.kind == "header-field":
            entries = header_entries(raw)
            key = _pick([k for k in entries if k != "__metadata__"], self.number)
            entries[key][["dtype", "shape", "data_offsets"][self.number % 3]] = self.value
            raw = join_safetensors(json.dumps(entries).encode(), body)
        elif self.kind == "header":
            raw = join_safetensors(json.dumps(self.value).encode(), body)
        elif self.kind == "empty":
            raw = b""
        else:
            path.unlink()
            return
        path.write_bytes(raw)


@dataclass(frozen=True)
class EditMetadata:
    """``__metadata__`` with a field set (to any JSON value: safetensors allows strings only), dropped
    or replaced whole. orthoft reads the keys, not the metadata, as LyCORIS does."""

    kind: str
    field: str
    value: Any

    def apply(self, path: Path, prefix: str) -> None:
        raw = path.read_bytes()
        entries = header_entries(raw)
        if self.kind == "set":
            entries.setdefault("__metadata__", {})[self.field] = self.value
        elif self.kind == "set-text":
            entries.setdefault("__metadata__", {})[self.field] = str(self.value)
        elif self.kind == "replace":
            entries["__metadata__"] = self.value
        else:
            entries.pop("__metadata__", None)
        path.write_bytes(join_safetensors(json.dumps(entries).encode(), split_safetensors(raw)[1]))


OTHER_PREFIXES = ["lycoris", "lora_unet", "lora_te1", "lora_te"]


@dataclass(frozen=True)
class EditTensor:
    """One tensor dropped, renamed (to another module, a module that does not exist, another prefix, a
    name without a part, another part), misshapen, cast, or made non-finite."""

    kind: str
    index: int
    choice: int
    at: float

    def apply(self, path: Path, prefix: str) -> None:
        tensors = _tensors(path)
        key = _pick(tensors, self.index)
        name, _, part = key.partition(".")
        tensor = tensors[key]
        if self.kind == "drop":
            del tensors[key]
        elif self.kind == "rename":
            renamed = [
                f"{prefix}_{MODULES[self.choice % len(MODULES)]}.{part}",
                f"{prefix}_fc9.{part}",
                f"{OTHER_PREFIXES[self.choice % 4]}_{name.removeprefix(f'{prefix}_')}.{part}",
                f"{name}_{part}",
                f"{name}.{part}s",
                f"{name}.{part}.weight",
            ][self.choice % 6]
            tensors[renamed] = tensors.pop(key)
        elif self.kind == "misshape":
            shapes = [
                (tensor.numel(),),
                (*tensor.shape, 1),
                (tensor.shape[0] + 1, *tensor.shape[1:]) if tensor.dim() else (2,),
                (),
                (*tensor.shape[:-1], 0) if tensor.dim() else (0,),
                tuple(reversed(tensor.shape)),
                (*tensor.shape[:-2], 1, 1) if tensor.dim() >= 2 else (1, 1),
            ]
            tensors[key] = torch.randn(shapes[self.choice % len(shapes)])
        elif self.kind == "cast":
            tensors[key] = (tensor * 4).to(DTYPES[self.choice % len(DTYPES)])
        else:  # non-finite
            tensor = tensor.clone()
            tensor.view(-1)[int(self.at * (tensor.numel() - 1))] = _nonfinite(self.choice)
            tensors[key] = tensor
        save_file(tensors, path)


# What a loaded tensor may be stored as: LyCORIS and orthoft save in the adapter's own dtype.
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ALPHA_VALUES = [0.0, 1e-3, 5.0, 1e30, -1.0, -1e-9, math.nan, math.inf, -math.inf]


@dataclass(frozen=True)
class EditAlpha:
    """One module's ``alpha`` (its constraint) missing, of another shape, value or dtype."""

    kind: str
    index: int
    choice: int
    value: float

    def apply(self, path: Path, prefix: str) -> None:
        tensors = _tensors(path)
        key = f"{_pick(_module_names(tensors), self.index)}.alpha"
        alpha = tensors.get(key, torch.tensor(0.0))
        if self.kind == "drop":
            tensors.pop(key, None)
        elif self.kind == "shape":
            tensors[key] = (
                alpha.reshape(1).expand([(1,), (2,), (1, 1), (0,), (4, 4)][self.choice % 5]).clone()
            )
        elif self.kind == "value":
            tensors[key] = torch.tensor(self.value)
        else:
            tensors[key] = torch.tensor(3.0).to(DTYPES[self.choice % len(DTYPES)])
        save_file(tensors, path)


FOREIGN_PARTS = [
    "lokr_w1",
    "lokr_w2",
    "lokr_w1_a",
    "lora_down.weight",
    "lora_up.weight",
    "hada_w1_a",
    "oft_diag",
    "dora_scale",
    "diff",
    "w_norm",
]


@dataclass(frozen=True)
class ForeignKeys:
    """Keys of another LyCORIS algorithm (LoKr, LoRA, LoHa, ...): beside a module's OFT tensors, in place of
    them, or for a module that does not exist."""

    kind: str
    part: str
    index: int

    def apply(self, path: Path, prefix: str) -> None:
        tensors = _tensors(path)
        name = _pick(_module_names(tensors), self.index)
        if self.kind == "replace":  # the module is a LoRA/LoKr one now
            for part in ("oft_blocks", "rescale"):
                tensors.pop(f"{name}.{part}", None)
        elif self.kind == "unmatched":
            name = f"{prefix}_decoder_proj"
        tensors[f"{name}.{self.part}"] = torch.randn(4, 4)
        save_file(tensors, path)


@dataclass(frozen=True)
class NoModule:
    """Names matching no module: one more module, one name with a suffix, or every name."""

    kind: str
    index: int

    def apply(self, path: Path, prefix: str) -> None:
        tensors = _tensors(path)
        name = _pick(_module_names(tensors), self.index)
        if self.kind == "extra-module":
            tensors[f"{prefix}_head.oft_blocks"] = torch.randn(2, 4, 4)
            tensors[f"{prefix}_head.alpha"] = torch.tensor(0.0)
        elif self.kind == "suffix":
            tensors = {k.replace(f"{name}.", f"{name}_x.", 1): v for k, v in tensors.items()}
        else:
            tensors = {k.replace(f"{prefix}_", f"{prefix}_missing_", 1): v for k, v in tensors.items()}
        save_file(tensors, path)


fractions = st.floats(0.0, 1.0)
indices = st.integers(0, 50)
mutations = st.one_of(
    st.builds(
        FileBytes,
        st.sampled_from(
            [
                "truncate",
                "garbage",
                "header-size",
                "header-cut",
                "header-splice",
                "header-field",
                "header",
                "empty",
                "missing",
            ]
        ),
        fractions,
        st.binary(min_size=1, max_size=32) | st.sampled_from([b"\xff\xfe", b"\xc3(", b'"', b"}", b"{", b","]),
        st.sampled_from([0, 1, 7, 2**31, 2**32 + 5, 10**8, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
        HEADER_VALUES,
    ),
    st.builds(
        EditMetadata,
        st.sampled_from(["set", "set-text", "replace", "drop"]),
        st.sampled_from(["ss_network_module", "ss_network_args", "format", "no_such_field"]),
        HEADER_VALUES,
    ),
    st.builds(
        EditTensor,
        st.sampled_from(["drop", "rename", "misshape", "cast", "non-finite"]),
        indices,
        indices,
        fractions,
    ),
    st.builds(
        EditAlpha,
        st.sampled_from(["drop", "shape", "value", "dtype"]),
        indices,
        indices,
        st.sampled_from(ALPHA_VALUES) | st.floats(allow_nan=True, allow_infinity=True),
    ),
    st.builds(
        ForeignKeys,
        st.sampled_from(["beside", "replace", "unmatched"]),
        st.sampled_from(FOREIGN_PARTS),
        indices,
    ),
    st.builds(NoModule, st.sampled_from(["extra-module", "suffix", "all"]), indices),
)


# ---------------------------------------------------------------------------------------------
# The property


def _by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        grouped.setdefault(name, {})[part] = value
    return grouped


def assert_unchanged(model: nn.Module, base_state: dict[str, torch.Tensor], base_types: list[type]) -> None:
    state = model.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[key], value) for key, value in base_state.items())
    assert [type(module) for module in model.modules()] == base_types
    assert "_orthoft_state" not in model.__dict__


def assert_loaded_exactly(
    model: nn.Module, path: Path, prefix: str, base_state: dict[str, torch.Tensor], base_types: list[type]
) -> None:
    """Each module of the file under ``prefix`` that SmallNet has is adapted with the file's algorithm,
    block size, constraint and tensors (in the model's dtype); nothing else changed."""
    grouped = _by_module(load_file(path))
    expected = {
        module: grouped[f"{prefix}_{module}"] for module in MODULES if f"{prefix}_{module}" in grouped
    }
    layers = dict(named_orthoft_layers(model))
    assert set(layers) == set(expected)
    for module, parts in expected.items():
        layer = layers[module]
        assert layer.adapter_names == ["default"]
        adapter, options = layer.lycoris["default"], layer.adapter_options["default"]
        blocks = parts["oft_blocks"]
        assert options.algo == ("diag-oft" if blocks.dim() == 3 else "boft")
        assert options.block_size == blocks.shape[-1]
        assert "alpha" in parts, f"{module} loaded without alpha"
        assert options.constraint == parts["alpha"].item()
        assert torch.equal(adapter.oft_blocks, blocks.to(adapter.oft_blocks.dtype))
        if "rescale" in parts:
            assert adapter.rescale is not None
            expected_rescale = parts["rescale"].to(adapter.rescale.dtype).reshape(-1)
            assert torch.equal(adapter.rescale.reshape(-1), expected_rescale)
        else:
            assert adapter.rescale is None
        assert set(parts) <= {"oft_blocks", "alpha", "rescale"}
        for part, value in parts.items():  # nothing else is an adapter's value
            assert value.dtype in ADAPTER_DTYPES, f"{module}.{part} loaded from {value.dtype}"
            assert bool(value.isfinite().all()), f"{module}.{part} loaded with NaN or Inf"
    orthoft.unload(model)
    assert_unchanged(model, base_state, base_types)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet()


@pytest.fixture(scope="module")
def templates(base: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    torch.manual_seed(1)
    paths = []
    for index, producer in enumerate(PRODUCERS):
        path = tmp_path_factory.mktemp(f"producer{index}") / FILE_NAME
        producer.write(base, path)
        paths.append(path)
    return paths


def _lycoris_reads(base: nn.Module, path: Path, prefix: str) -> nn.Module:
    """``base`` with the network LyCORIS builds from the file (kohya names read as LyCORIS's)."""
    quiet_lycoris()
    tensors = {key.replace(f"{prefix}_", "lycoris_", 1): value for key, value in load_file(path).items()}
    model = copy.deepcopy(base)
    network, _ = lycoris.create_lycoris_from_weights(1.0, None, model, weights_sd=tensors)
    network.apply_to()
    return model


def test_every_producer_writes_a_file_that_loads_exactly(base: nn.Module, templates: list[Path]) -> None:
    state = {key: value.clone() for key, value in base.state_dict().items()}
    types = [type(module) for module in base.modules()]
    x, image = small_inputs()
    for producer, path in zip(PRODUCERS, templates, strict=True):
        assert {key.partition(".")[0] for key in load_file(path)} == {
            f"{producer.prefix}_{m}" for m in MODULES
        }
        model = orthoft.load_adapter(copy.deepcopy(base), path)
        with torch.no_grad():
            out, expected = model(x, image), _lycoris_reads(base, path, producer.prefix)(x, image)
            assert not torch.allclose(out, base(x, image), atol=1e-3), producer.name
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=producer.name)
        assert_loaded_exactly(model, path, producer.prefix, state, types)


def test_mutated_files_load_exactly_or_fail_cleanly(
    base: nn.Module, templates: list[Path], summary_line: Callable[[str], None]
) -> None:
    base_state = {key: value.clone() for key, value in base.state_dict().items()}
    base_types = [type(module) for module in base.modules()]
    tally: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    start = time.perf_counter()

    def failed(outcome: str, case: str, detail: str) -> None:
        tally[outcome] += 1
        failures.append(f"{outcome}: {case}: {detail}")

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=not RANDOM_CASES,
        suppress_health_check=list(HealthCheck),
    )
    @given(producer=st.integers(0, len(PRODUCERS) - 1), mutation=mutations, low_memory=st.booleans())
    def case(producer: int, mutation: Any, low_memory: bool) -> None:
        prefix = PRODUCERS[producer].prefix
        label = f"{PRODUCERS[producer].name}, {mutation!r}, low_cpu_mem_usage={low_memory}"
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / FILE_NAME
            shutil.copy(templates[producer], path)
            mutation.apply(path, prefix)
            kinds[f"{type(mutation).__name__} {mutation.kind}"] += 1
            model = copy.deepcopy(base)
            try:
                with time_limit(CASE_TIME_LIMIT_S), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    orthoft.load_adapter(model, path, low_cpu_mem_usage=low_memory)
            except CaseTimeout as error:
                failed("hang", label, str(error))
                return
            except (ValueError, TypeError, OSError) as error:
                if FILE_NAME not in str(error):
                    failed("error naming no file", label, repr(error))
                    return
                try:
                    assert_unchanged(model, base_state, base_types)
                except AssertionError as unchanged:
                    failed("model changed", label, f"{error!r}; {unchanged!r}")
                    return
                tally["clean error"] += 1
                return
            except Exception as error:
                failed("other exception", label, repr(error))
                return
            try:
                assert_loaded_exactly(model, path, prefix, base_state, base_types)
            except AssertionError as inexact:
                failed("loaded inexactly", label, repr(inexact))
                return
            tally["loaded exactly"] += 1

    case()
    total = sum(tally.values())
    outcomes = ", ".join(f"{name} {count}" for name, count in sorted(tally.items()))
    summary_line(
        f"LyCORIS file fuzzer: {total} mutated files from {len(PRODUCERS)} producers in "
        f"{time.perf_counter() - start:.1f} s: {outcomes}"
    )
    summary_line("LyCORIS file fuzzer mutations: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    assert total >= min(CASES, 50)
    assert not failures, f"{len(failures)} cases failed:\n" + "\n".join(failures[:40])
