"""Pieces shared by the loader fuzzers: a time limit per case and safetensors files taken apart."""

from __future__ import annotations

import contextlib
import json
import signal
import struct
from collections.abc import Iterator
from typing import Any


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
