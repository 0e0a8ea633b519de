"""Timing of the competitors of one case in interleaved rounds.

Every competitor of a shape is built and warmed up, then timed in rounds, ``A B C A B C ...``: in each
round every competitor runs a few repeats back to back, each repeat being ``inner`` steps. A
competitor's figure is its best round's median; its spread is how far its worst round median lies
above that. Because all competitors run in every round, a disturbance (another process, a frequency
change) hits them together, and the ratio of two competitors within one round is the side-by-side
measure that the targets and the report use.

On CUDA each repeat is bracketed by a pair of ``torch.cuda.Event``s on the current stream and the
device is synchronised before the events are read; on CPU a repeat is timed with ``perf_counter``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cases import Size, Step


@dataclass(frozen=True)
class TimingPolicy:
    rounds: int
    warmup_seconds: float  # each competitor runs at least two steps and at least this long before round 1
    min_repeat_seconds: float  # a repeat runs enough steps to last this long (timer resolution, launches)
    round_seconds: float  # a competitor's repeats in one round last about this long (at least one repeat)
    max_repeats: int  # per competitor and round


def default_policy(device: torch.device, size: Size, rounds: int | None) -> TimingPolicy:
    if size == "smoke":  # checks that the harness works; the numbers mean nothing
        return TimingPolicy(rounds or 2, 0.0, 1e-3, 2e-3, max_repeats=2)
    if device.type == "cuda":
        return TimingPolicy(rounds or 7, 0.2, 2e-3, 5e-2, max_repeats=9)
    if size == "quick":
        return TimingPolicy(rounds or 5, 0.2, 2e-2, 0.15, max_repeats=5)
    return TimingPolicy(rounds or 7, 0.3, 2e-2, 0.25, max_repeats=7)


@dataclass(frozen=True)
class Timing:
    rounds: list[list[float]]  # per round, per repeat: the time of one step in seconds
    inner: int  # steps per repeat

    @property
    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds]

    @property
    def best(self) -> float:
        """The best round's median time of one step: the figure that is reported."""
        return min(self.round_medians)

    @property
    def spread(self) -> float:
        """The worst round median over the best one, minus 1 (0.05: the rounds lie within 5%)."""
        medians = self.round_medians
        return max(medians) / min(medians) - 1


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Runner:
    """One competitor's step, its running input-set index, and how many steps make a repeat."""

    def __init__(self, step: Step, device: torch.device) -> None:
        self.step = step
        self.device = device
        self.index = 0
        self.inner = 1
        self.repeats = 1

    def run(self, count: int) -> None:
        for _ in range(count):
            self.step(self.index)
            self.index += 1

    def wall_seconds_per_step(self, count: int) -> float:
        _synchronize(self.device)
        start = time.perf_counter()
        self.run(count)
        _synchronize(self.device)
        return (time.perf_counter() - start) / count

    def warm_up_and_calibrate(self, policy: TimingPolicy) -> None:
        self.wall_seconds_per_step(1)  # lazy initialisation, allocator growth, one-time caches
        estimate = self.wall_seconds_per_step(1)
        extra = math.ceil(policy.warmup_seconds / max(estimate, 1e-9))
        if extra > 0:
            estimate = min(estimate, self.wall_seconds_per_step(extra))
        self.inner = max(1, math.ceil(policy.min_repeat_seconds / max(estimate, 1e-9)))
        repeats = int(policy.round_seconds / max(estimate * self.inner, 1e-9))
        self.repeats = max(1, min(policy.max_repeats, repeats))

    def time_round(self) -> list[float]:
        if self.device.type == "cuda":
            return self._cuda_round()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            self.run(self.inner)
            times.append((time.perf_counter() - start) / self.inner)
        return times

    def _cuda_round(self) -> list[float]:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.repeats)
        ]
        for start, end in events:
            start.record()
            self.run(self.inner)
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) / 1e3 / self.inner for start, end in events]


def measure_interleaved(steps: Sequence[Step], device: torch.device, policy: TimingPolicy) -> list[Timing]:
    """Times ``steps`` (the competitors of one case) in interleaved rounds; one ``Timing`` each, in order."""
    runners = [_Runner(step, device) for step in steps]
    for runner in runners:
        runner.warm_up_and_calibrate(policy)
    rounds: list[list[list[float]]] = [[] for _ in runners]
    for _ in range(policy.rounds):
        gc.collect()
        gc.disable()  # a collection inside a repeat would be charged to whichever step triggered it
        try:
            for runner, times in zip(runners, rounds, strict=True):
                times.append(runner.time_round())
        finally:
            gc.enable()
    return [Timing(times, runner.inner) for runner, times in zip(runners, rounds, strict=True)]
