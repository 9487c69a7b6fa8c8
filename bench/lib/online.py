"""The online loop: each request added at its arrival time, the engine stepped until all are done.

Contract: standard library only (vLLM's side runs the same loop inside .venv-vllm). `run_arrivals`
drives any engine through a small adapter (`OnlineEngine`: admit, has_unfinished, step) on a
clock, and returns a `RequestRecord` per admitted request and the number refused at admission.
New arrivals are added at every step boundary. A request's first token and end are stamped at
the end of the step that produced them (the return of `step()`), on the run's clock.

Clocks (`CLOCKS`):
- `wall`: this machine as it is, seconds since the run's start; an idle engine sleeps until the
  next arrival.
- `parallel`: a model of one device per instance. Time advances by each step's modelled seconds
  (`StepClock(step_seconds)`: for infinillm, `engine.last_step.parallel_seconds()`, the driver's
  share plus the slowest instance), arrivals follow that clock, and idle gaps are skipped
  instead of slept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from bench.lib.metrics import RequestRecord
from bench.lib.workloads import Arrival

CLOCKS = ("wall", "parallel")


class OnlineEngine(Protocol):
    def admit(self, arrival: Arrival, index: int) -> str | None:
        """Queue the request; its id, or None when the engine refuses it at admission."""

    def has_unfinished(self) -> bool: ...

    def step(self) -> Sequence:
        """One engine step; vLLM-shaped RequestOutputs (request_id, finished, and cumulative
        outputs[0].token_ids) of the requests that made progress."""


class WallClock:
    """Seconds since the clock was made; waiting sleeps."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def skip_to(self, at_s: float) -> None:
        time.sleep(max(0.0, at_s - self.now()))

    def after_step(self) -> None:
        pass


class StepClock:
    """Virtual seconds: advanced by `step_seconds()` after every step; waiting skips ahead."""

    def __init__(self, step_seconds: Callable[[], float]) -> None:
        self.step_seconds = step_seconds
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def skip_to(self, at_s: float) -> None:
        self.t = max(self.t, at_s)

    def after_step(self) -> None:
        self.t += self.step_seconds()


def run_arrivals(
    workload: Sequence[Arrival],
    engine: OnlineEngine,
    clock: WallClock | StepClock,
    on_step: Callable[[float], None] | None = None,
) -> tuple[dict[str, RequestRecord], int]:
    """Serve `workload` on `engine`; (records by request id, number refused). `on_step(now)`
    runs after every step (block counts, timelines)."""
    records: dict[str, RequestRecord] = {}
    refused = next_i = 0
    while next_i < len(workload) or engine.has_unfinished():
        now = clock.now()
        while next_i < len(workload) and workload[next_i].at_s <= now:
            a = workload[next_i]
            rid = engine.admit(a, next_i)
            next_i += 1
            if rid is None:
                refused += 1
            else:
                records[rid] = RequestRecord(a.at_s, len(a.prompt_ids), a.max_new)
        if not engine.has_unfinished():
            if next_i < len(workload):
                clock.skip_to(workload[next_i].at_s)
            continue
        outs = engine.step()
        clock.after_step()
        now = clock.now()
        record_outputs(records, outs, now)
        if on_step is not None:
            on_step(now)
    return records, refused


def record_outputs(records: dict[str, RequestRecord], outs: Sequence, now: float) -> None:
    """Note one step's outputs (vLLM-shaped RequestOutputs, cumulative token ids) at `now`."""
    for o in outs:
        r = records[o.request_id]
        r.num_tokens = len(o.outputs[0].token_ids)
        if r.first_token_s is None and r.num_tokens:
            r.first_token_s = now
        if o.finished:
            r.end_s = now
