"""Pieces shared by the loader fuzzers: a time limit per case, safetensors files taken apart, and what
mutations draw from."""

from __future__ import annotations

import contextlib
import json
import signal
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from hypothesis import strategies as st

# What a mutated tensor is cast to: integer, bool and float8 must be refused, the float dtypes cast.
DTYPES = [
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def json_values(strings: Sequence[str]) -> st.SearchStrategy[Any]:
    """Any JSON value, nested a little, its strings sometimes drawn from ``strings``."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=12)
        | st.sampled_from(list(strings)),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3)
        ),
        max_leaves=6,
    )


class CaseTimeout(AssertionError):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupts the case after ``seconds`` (``re`` and Python code both check for signals)."""

    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"the case ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def split_safetensors(raw: bytes) -> tuple[bytes, bytes]:
    """The JSON header and the data of a safetensors file (an 8-byte little-endian header size first)."""
    (size,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + size], raw[8 + size :]


def join_safetensors(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def header_entries(raw: bytes) -> dict[str, Any]:
    """The parsed header: tensor name -> {dtype, shape, data_offsets}, and ``__metadata__`` if any."""
    return json.loads(split_safetensors(raw)[0])
