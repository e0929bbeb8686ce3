"""glibc malloc settings for processes that pass large results along.

A result travels as messages of up to a few MB, and each hop allocates and frees several
buffers of that size (gRPC's receive buffer, the protobuf arena, the Python bytes). glibc serves
an allocation above ``M_MMAP_THRESHOLD`` (128 KiB until its adaptive rule raises it) with a fresh
``mmap``, and gives heap tops above ``M_TRIM_THRESHOLD`` back to the kernel: either way every
page of the next buffer is faulted in and zeroed again. Measured here: building and serializing
one 4 MB protobuf message took 6 ms with the defaults and 0.3 ms with these settings; in
``bench/bench_sandbox.py`` a 10M-row result took 742 ms through the tunnel and 338 ms locally
before, 558 ms and 284 ms after (README, Benchmarks).

With these settings buffers below 32 MiB come from the heap and up to 64 MiB of freed heap (per
glibc arena) is kept for reuse, so a process's resident size shrinks less after a large result.
In a sandbox that memory counts against the container's limit; 64 MiB keeps it small beside
the policy's headroom (DuckDB gets 60% of the limit), and was as fast as 256 MiB. The sandbox
image sets the same values as environment variables (its Dockerfile), read by glibc when the
runner starts; ``ENVIRONMENT`` is that form, for tests.
"""

from __future__ import annotations

import ctypes
import logging

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit (half of a 64 MiB arena heap)
TRIM_THRESHOLD = 64 * 1024 * 1024

# mallopt parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}

_log = logging.getLogger(__name__)


def tune_allocator() -> bool:
    """Apply the settings to this process; False where the C library has no ``mallopt`` or
    refuses a value (32-bit glibc refuses the mmap threshold and keeps only the trim one)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this Python is linked with
    except (OSError, AttributeError, TypeError):  # macOS and musl have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    applied = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and applied
    if not applied:
        _log.debug("mallopt refused the allocator settings; keeping glibc's defaults")
    return applied
