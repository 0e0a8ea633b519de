"""Live memory of one step: what a case holds between steps, and the peak the step adds on top.

Both devices count the bytes of live tensor storages, exactly, as torch's allocator hands them out:

- CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (live blocks, not the cache).
- CPU: torch's CPU allocator reports every allocation and free, with its size, to the profiler when
  ``profile_memory=True``. Summing those reports in time order gives the live bytes after each one;
  its maximum is the live peak, as if every freed block went back to the system at once. Memory that
  BLAS or OpenMP allocate behind torch's back is not counted (a few MiB of workspace at most), nor
  is anything that existed before the measurement started.

The case is built inside the measurement, then runs one warm-up step (lazily created state, the
optimizer's moments) and the measured step. ``held`` is what is live when the measured step starts
(weights, adapters, inputs, optimizer state); ``peak`` is the step's live peak above ``held``
(activations kept for backward, gradients, temporaries, the optimizer's work).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from cases import Step

_MEASURED_STEP = "orthoft-benchmarks: measured step"
_CPU = torch.autograd.DeviceType.CPU


@dataclass(frozen=True)
class Memory:
    held_bytes: int
    peak_bytes: int


def measure_memory(build: Callable[[], Step], device: torch.device) -> Memory:
    gc.collect()
    if device.type == "cuda":
        return _cuda_memory(build, device)
    return _cpu_memory(build)


def _cuda_memory(build: Callable[[], Step], device: torch.device) -> Memory:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    step = build()
    step(0)
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return Memory(held_bytes=start - before, peak_bytes=peak - start)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Hides the lines the profiler prints when it starts and stops; nothing else runs inside."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_memory(build: Callable[[], Step]) -> Memory:
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        profiler.start()
    try:
        step = build()
        step(0)
        with record_function(_MEASURED_STEP):
            step(1)
        del step
    finally:
        with _quiet_stderr():
            profiler.stop()
    return held_and_peak(profiler)


def held_and_peak(profiler: profile) -> Memory:
    """Live bytes when the marked step starts, and the step's live peak above that."""
    events = profiler.profiler.kineto_results.events()  # type: ignore[union-attr]
    marks = [e for e in events if e.name() == _MEASURED_STEP]
    if len(marks) != 1:
        raise RuntimeError(f"expected one {_MEASURED_STEP!r} range in the profile, found {len(marks)}")
    begin, end = marks[0].start_ns(), marks[0].start_ns() + marks[0].duration_ns()
    changes = sorted(
        ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == _CPU),
        key=lambda change: change[0],  # stable: simultaneous reports keep the order they were made in
    )
    live = 0
    held: int | None = None
    peak = 0
    for time_ns, nbytes in changes:
        if time_ns > end:
            break
        if held is None and time_ns >= begin:
            held = peak = live
        live += nbytes
        if held is not None:
            peak = max(peak, live)
    if held is None:  # the step allocated nothing
        held = peak = live
    return Memory(held_bytes=held, peak_bytes=peak - held)
