"""The same memory conditions for every competitor of a CPU run: no page faults in the timed steps.

glibc serves a large block either from its heap or from a fresh mapping, depending on its dynamic
mmap threshold and on how much free memory the top of its heap holds at that moment, that is on the
order of earlier allocations. A fresh mapping pays a page fault per 4 KiB (writing a new 64 MiB
tensor: 22-25 ms on one thread, against 2 ms in mapped memory), so the same case measured
0.04 ms in one run and 8 ms in another, and two full runs disagreed by up to 72% on ratios with 64 MiB
outputs. With mappings off and trimming off, every block comes from the heap and freed memory stays
mapped: after the warm-up steps each competitor's step runs in memory that is already mapped, as
with a caching allocator (CUDA's, jemalloc, tcmalloc), and the times measure the work of the step.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
_M_MMAP_MAX = -4
NEVER_TRIM_BYTES = 2**31 - 1  # the largest value mallopt takes


def keep_memory_mapped() -> bool:
    """Turns off glibc's fresh mappings for large blocks and the trimming of its heap; False without
    glibc. Allocations then never return memory to the system: the process keeps its peak."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, NEVER_TRIM_BYTES))
