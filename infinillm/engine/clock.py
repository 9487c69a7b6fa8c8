"""Clocks: where the engine reads time. Wall time by default; a simulation runs on virtual time.

The engine stamps every step with `now()` and, after the cluster's synchronous step, calls
`advance(seconds)` with the slowest instance's execute time. Wall time passes by itself, so the
wall clock ignores that; a virtual clock moves by exactly that much, which is how an executor
that runs no model (and reports a modelled step time) drives the very same engine.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod


class Clock(ABC):
    @abstractmethod
    def now(self) -> float:
        """Seconds since an arbitrary origin, never decreasing."""

    @abstractmethod
    def advance(self, seconds: float) -> None:
        """A cluster step of `seconds` just ran."""


class WallClock(Clock):
    def now(self) -> float:
        return time.perf_counter()

    def advance(self, seconds: float) -> None:
        pass  # wall time has already passed


class VirtualClock(Clock):
    """Time that moves only when told: by steps, or by `sleep` while nothing runs."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back, got {seconds} s")
        self._now += seconds

    def sleep(self, seconds: float) -> None:
        """Idle time (no step ran), e.g. until the next arrival of a trace."""
        self.advance(seconds)
