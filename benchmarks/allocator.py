"""The same memory conditions for every competitor of a CPU run.

glibc raises its mmap threshold as large blocks are freed, after which a freed block of tens of MiB
stays in the process and the next allocation of that size gets pages that are already mapped, while
a fresh one pays a page fault per 4 KiB. Which competitor gets which depends on the order of
allocations, and it changed a 64 MiB ``torch.zeros`` from 0.04 ms to 8 ms between two runs. Fixing
the threshold makes every block of 128 KiB or more a fresh mapping, returned to the system when freed:
each competitor pays for the memory it touches, in every round.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD_BYTES = 128 * 1024


def fix_mmap_threshold() -> bool:
    """Fixes glibc's mmap threshold (which also stops its adjustment); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES))
