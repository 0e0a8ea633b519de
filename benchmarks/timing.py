"""Timing of one step: warm-up, calibrated inner loops, several repeats, median.

On CUDA each repeat is bracketed by a pair of ``torch.cuda.Event``s on the current stream and the
device is synchronised before the events are read; on CPU a repeat is timed with ``perf_counter``.
A repeat runs the step ``inner`` times back to back, so that launch overhead and timer resolution do
not dominate fast steps, and reports the time of one step.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch

from cases import Size, Step


@dataclass(frozen=True)
class TimingPolicy:
    repeats: int
    warmup: int
    min_repeat_seconds: float  # an inner loop lasts at least this long
    max_case_seconds: float  # fewer repeats (never under MIN_REPEATS) for slow cases


MIN_REPEATS = 3


def default_policy(device: torch.device, size: Size, repeats: int | None) -> TimingPolicy:
    if size == "smoke":  # checks that the harness works; the numbers mean nothing
        return TimingPolicy(repeats or MIN_REPEATS, warmup=1, min_repeat_seconds=1e-3, max_case_seconds=0.2)
    if device.type == "cuda":
        return TimingPolicy(repeats or 20, warmup=3, min_repeat_seconds=2e-3, max_case_seconds=1.0)
    return TimingPolicy(repeats or 7, warmup=2, min_repeat_seconds=2e-2, max_case_seconds=4.0)


@dataclass(frozen=True)
class Timing:
    step_seconds: list[float]  # one entry per repeat: the time of one step
    inner: int  # steps per repeat (CPU repeats past the case's time limit run fewer)

    @property
    def median(self) -> float:
        return statistics.median(self.step_seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_time_per_step(step: Step, device: torch.device, first: int, count: int) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for i in range(first, first + count):
        step(i)
    _synchronize(device)
    return (time.perf_counter() - start) / count


def _cuda_repeats(step: Step, device: torch.device, first: int, repeats: int, inner: int) -> list[float]:
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
    ]
    i = first
    for start, end in events:
        start.record()
        for _ in range(inner):
            step(i)
            i += 1
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 / inner for start, end in events]


def _cpu_repeats(step: Step, first: int, repeats: int, inner: int, seconds: float) -> list[float]:
    """Like the CUDA loop, but past ``seconds`` (a busy machine, a bad estimate) repeats shrink to one
    step and stop once there are MIN_REPEATS of them."""
    times: list[float] = []
    i = first
    deadline = time.perf_counter() + seconds
    while len(times) < repeats:
        start = time.perf_counter()
        done = 0
        while done < inner:
            step(i)
            i += 1
            done += 1
            if time.perf_counter() > deadline:
                break
        now = time.perf_counter()
        times.append((now - start) / done)
        if now > deadline and len(times) >= MIN_REPEATS:
            break
    return times


def measure(step: Step, device: torch.device, policy: TimingPolicy) -> Timing:
    """Median time of ``step`` after warm-up; input sets rotate with the running step index."""
    first_step = _wall_time_per_step(step, device, 0, 1)  # lazy initialisation, allocator growth
    estimate = first_step
    if policy.warmup > 1:
        estimate = _wall_time_per_step(step, device, 1, policy.warmup - 1)
    inner = max(1, math.ceil(policy.min_repeat_seconds / max(estimate, 1e-9)))
    repeats = int(policy.max_case_seconds / max(estimate * inner, 1e-9))
    repeats = max(MIN_REPEATS, min(policy.repeats, repeats))
    gc.collect()
    gc.disable()  # a collection inside a repeat would be charged to the step
    try:
        if device.type == "cuda":
            times = _cuda_repeats(step, device, policy.warmup, repeats, inner)
        else:
            times = _cpu_repeats(step, policy.warmup, repeats, inner, policy.max_case_seconds)
    finally:
        gc.enable()
    return Timing(times, inner)
