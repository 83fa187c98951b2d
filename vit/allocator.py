"""Keep freed memory in the process, so that CPU steps stop faulting their activations back in.

glibc's malloc serves blocks above a threshold straight from the kernel (``mmap``) and gives
them back when they are freed, and it trims the top of its heap as soon as enough of it is
free. A training step frees and reallocates the same activations every step, so every step the
kernel maps them afresh and zeroes each 4 KiB page on first touch: about 6,000 page faults a
step of the CPU recipe (batch 32), 8,000-80,000 for ``tiny`` and ``small`` at batch 128, and
a step 1.07-1.15 times as long (``python -m benchmarks.allocator``, benchmarks/RESULTS.md). With
the threshold fixed at glibc's ceiling of 32 MiB and trimming off, freed blocks stay in the
heap and the next step reuses them: the process holds on to its peak memory instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CEILING = 32 * 1024 * 1024  # the largest mmap threshold glibc accepts on 64 bits


def is_glibc() -> bool:
    """Whether this process runs on glibc, whose malloc policy ``keep_freed_memory`` sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse and never trim its heap.

    Applies to the whole process, once; returns whether it took effect (False where the C
    library is not glibc: macOS, Windows, musl, which keep their own policies).
    """
    if not is_glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # -1 as the trim threshold is "never trim" (man 3 mallopt); mallopt returns 1 on success.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, -1)
    )
