"""The same memory conditions for every competitor of a CPU run.

glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which a freed block
stays in the process and the next allocation of that size gets pages that are already mapped, while a
fresh mapping pays a page fault per 4 KiB. Which competitor gets which depended on the order of
allocations: it moved a 64 MiB ``torch.zeros`` from 0.04 ms to 8 ms between two runs. Fixing the
threshold where glibc's adaptation ends (32 MiB) and keeping freed heap memory gives every
competitor, in every round, what a long training loop sees: blocks under 32 MiB reuse mapped memory,
larger blocks are fresh mappings.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES


def fix_mmap_threshold() -> bool:
    """Fixes glibc's mmap and trim thresholds (which stops their adjustment); False without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
