"""Peak memory of one step.

CUDA: in process. Build the case (one input set), run a step, ``reset_peak_memory_stats``, run the
measured step, read ``max_memory_allocated`` and subtract what was allocated before the build.

CPU: a fresh process per case, forked from a server that has imported torch, orthoft, peft and the
suites and run nothing. It builds the case, runs two steps and reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``); the result is the increase over idle processes from the same
server that only warm up torch. ``RUSAGE_CHILDREN`` is not used: it keeps the largest child so far,
not the last one.

Both count everything the case holds at its peak: inputs, weights, adapters, activations kept for
backward, gradients and temporaries.
"""

from __future__ import annotations

import gc
import multiprocessing
import resource
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch

from cases import DTYPES, Case, Step
from suites import SUITES

_IDLE_PROBES = 3
_PRELOAD = ["torch", "orthoft", "peft", "memory", "suites"]  # a missing module is skipped


def cuda_peak_bytes(build: Callable[[], Step], device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    step = build()
    step(0)  # lazily created state (cuBLAS workspaces, cached index maps) belongs to every later step
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def _warm_up_torch() -> None:
    """Create the thread pool and autograd engine that every case needs, idle probes included."""
    x = torch.randn(64, 64, requires_grad=True)
    (x @ x).sum().backward()


def _probe(job: tuple[int, tuple[str, dict[str, Any], str] | None]) -> int:
    """Runs in a fresh child: peak RSS in bytes of one case (``None``: of an idle process)."""
    threads, case = job
    torch.set_num_threads(threads)
    _warm_up_torch()
    if case is not None:
        suite_name, spec, dtype = case
        step = SUITES[suite_name].build(spec, torch.device("cpu"), DTYPES[dtype], False)
        step(0)
        step(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_peak_bytes(cases: list[Case], workers: int, threads: int) -> Iterator[tuple[Case, int]]:
    """Yields each case, in order, with its peak RSS increase in bytes."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    with context.Pool(workers, maxtasksperchild=1) as pool:
        idle = statistics.median(pool.map(_probe, [(threads, None)] * _IDLE_PROBES))
        jobs = [(threads, (case.suite, case.spec, case.dtype)) for case in cases]
        for case, peak in zip(cases, pool.imap(_probe, jobs), strict=True):
            # RSS differs by a few hundred KiB between identical processes: below zero means none seen.
            yield case, max(0, int(peak - idle))
