"""glibc's allocator, set for a blob cache's churn of megabyte buffers.

Every chunk of a blob fetch is a buffer of up to 1 MiB (the upstream's read, and aiohttp's copy
of it) that lives a few milliseconds. glibc hands such a buffer out with a fresh ``mmap`` and
gives it back with ``munmap``; its threshold for that rises after the first free, but the heap
is then trimmed whenever twice the threshold lies free at its top, so buffer after buffer is
page-faulted in anew: 35,000 faults per 512 MiB cold blob here, 8% of the fetch's CPU. Fixed
thresholds end the churn (260 faults), at the price of keeping up to ``KEEP_FREE_BYTES`` of
freed heap for the next buffers.
"""

from __future__ import annotations

import ctypes

from proxy.memory import KEEP_FREE_BYTES, MMAP_ABOVE_BYTES

M_TRIM_THRESHOLD = -1  # mallopt's parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Set the thresholds (once, at start); False where the C library has no ``mallopt``
    (musl), which leaves its allocator as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES)
    )
