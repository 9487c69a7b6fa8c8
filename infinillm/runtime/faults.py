"""Fault injection, for tests only: an instance fails at a named point of a step.

Executors and fabrics hold `fault: Fault | None`, None outside tests; each point costs one
`is not None` test when unset. A fault is called as `fault(point, instance)` wherever
`instance` reaches `point`, and may make that instance fail there:

    "exchange.before"  a layer's exchange is about to start; called for the owner that starts it
                       and for each holder it will ask (the in-process fabric), or for the
                       process's own instance (the distributed fabric)
    "exchange.during"  the K/V rows and queries reached the holders and they computed their
                       partials, which have not reached the owner yet
    "move"             block moves (migration, recall) were read, not all written; called for
                       every instance a move reads from or writes to, before that write
    "sample"           the instance sampled its tokens, which have not reached the engine

`FaultPlan` fails one instance the n-th time it reaches one point: in-process by raising
`InjectedFault`, which the in-process executor reports as `InstanceLost` (and it forgets the
instance when the engine removes it); in a Ray actor by ending the actor's process, as a crash
would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from infinillm.types import InstanceId

FAULT_POINTS = ("exchange.before", "exchange.during", "move", "sample")

Fault = Callable[[str, InstanceId], None]


class InjectedFault(RuntimeError):
    """Raised where a fault plan fails an instance that lives in the caller's process."""

    def __init__(self, point: str, instance: InstanceId) -> None:
        super().__init__(f"fault injected at {point!r} on instance {instance}")
        self.point = point
        self.instance = instance


@dataclass(slots=True)
class FaultPlan:
    """Fail `instance` the `hit`-th time it reaches `point` (once). `exit_process` ends the
    process there (os._exit, no clean-up), for instances in processes of their own; otherwise
    InjectedFault is raised, for the in-process executor to report as a lost instance."""

    point: str
    instance: InstanceId
    hit: int = 1
    exit_process: bool = False
    num_reached: int = 0

    def __post_init__(self) -> None:
        if self.point not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {self.point!r}; known: {FAULT_POINTS}")
        if self.hit < 1:
            raise ValueError(f"hit counts from 1, got {self.hit}")

    @property
    def fired(self) -> bool:
        return self.num_reached >= self.hit

    def __call__(self, point: str, instance: InstanceId) -> None:
        if point != self.point or instance != self.instance or self.fired:
            return
        self.num_reached += 1
        if self.fired:
            if self.exit_process:
                os._exit(1)
            raise InjectedFault(point, instance)
