"""Handing freed native memory back to the operating system, for long-running servers.

PyTorch's CPU allocator is malloc. A step's tensors differ in size from the last step's (batches
change), and glibc returns a heap's free memory to the system only from the heap's top: the
holes left inside stay in the process's RSS, which therefore creeps up under a long varied load
although nothing leaks (Python's own heap, as tracemalloc sees it, stays flat).
`malloc_trim(0)` gives back every whole free page inside the heaps as well. `MemoryTrimmer`
calls it at most once per interval, from the engine thread between steps; where libc has no
`malloc_trim` (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable


def _malloc_trim() -> Callable[[], object] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class MemoryTrimmer:
    """`maybe_trim()` trims when `interval_s` seconds have passed since the last trim."""

    def __init__(self, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = interval_s
        self.clock = clock
        self.trim = _malloc_trim()
        self.last = clock()
        self.num_trims = 0

    def maybe_trim(self) -> bool:
        now = self.clock()
        if self.trim is None or now - self.last < self.interval_s:
            return False
        self.trim()
        self.last = now
        self.num_trims += 1
        return True
