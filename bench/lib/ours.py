"""infinillm in this process, for the benchmarks that drive `LLM(...).engine` by hand.

Contract: infinillm is imported inside the functions, so that bench.lib imports without it
(only the project's venv can call them). Engine state is read through public calls only:
`add_request`, `prepare`, `step`, `last_step` (a `StepRecord`), `cluster_stats`,
`check_integrity`, `migrate_block`, `block_locations`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from bench.lib.metrics import summarize
from bench.lib.online import StepClock, WallClock, run_arrivals
from bench.lib.workloads import Arrival, seeded_prompts

COUNTERS = ("preemptions", "remote_attention_calls", "remote_bytes", "migrations")


def greedy(max_tokens: int):
    """Sampling of every benchmark request: greedy, exactly `max_tokens` tokens (ignore_eos)."""
    from infinillm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def model_info(model: str | None):
    """(model folder, architecture) of `model` (None: the embedded default)."""
    from infinillm.model import load_arch
    from infinillm.model.resolve import resolve_model_path

    path = resolve_model_path(model)
    return path, load_arch(path)


def warm_up(llm, num_prompts: int, prompt_len: tuple[int, int], max_tokens: int,
            seed: int) -> None:
    """Untimed seeded generates, so that no timed run pays for the first steps of an engine."""
    prompts = seeded_prompts(llm.engine.arch.vocab_size, num_prompts, *prompt_len, seed=seed)
    llm.generate(prompts, greedy(max_tokens), use_tqdm=False)


def check_pools_whole(llm) -> dict:
    """The cluster stats, after checking that every pool is full again (no request left)."""
    stats = llm.cluster_stats()
    if any(i["free_blocks"] != i["total_blocks"] for i in stats["instances"]):
        raise RuntimeError(f"pools not full after every request ended: {stats['instances']}")
    return stats


def counter_deltas(before: dict, after: dict, keys: Sequence[str] = COUNTERS) -> dict:
    """This run's share of cumulative cluster_stats counters."""
    return {key: after.get(key, 0) - before.get(key, 0) for key in keys}


# ---- online: requests at their arrival times ---------------------------------------------------

class _Online:
    """`online.OnlineEngine` for infinillm: a prompt that cannot be served raises ValueError at
    admission, which counts as refused."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def admit(self, arrival: Arrival, index: int) -> str | None:
        try:
            return self.engine.add_request(arrival.prompt_ids, greedy(arrival.max_new))
        except ValueError:
            return None

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self):
        return self.engine.step()


class BlockWatch:
    """After every step: the most blocks borrowed and lent at once, and (with `keep_timeline`)
    [time, [used, lent, borrowed, free] per instance]."""

    def __init__(self, llm, keep_timeline: bool) -> None:
        self.llm, self.keep_timeline = llm, keep_timeline
        self.max_borrowed = self.max_lent = 0
        self.timeline: list = []

    def on_step(self, now: float) -> None:
        stats = self.llm.cluster_stats()["instances"]
        self.max_borrowed = max(self.max_borrowed, sum(i["borrowed_blocks"] for i in stats))
        self.max_lent = max(self.max_lent, sum(i["lent_blocks"] for i in stats))
        if self.keep_timeline:
            self.timeline.append([round(now, 3)] + [[i["used_blocks"], i["lent_blocks"],
                                                     i["borrowed_blocks"], i["free_blocks"]]
                                                    for i in stats])


def serve_online(llm, workload: list[Arrival], clock: str = "wall",
                 slo: tuple[float, float] | None = None, keep_timeline: bool = False) -> dict:
    """Serve `workload` on `llm.engine` (bench.lib.online), on the `wall` or `parallel` clock.

    The parallel clock advances by `engine.last_step.parallel_seconds()`: the step's driver time
    plus its slowest instance, as if each instance had its own device. Remote attention is
    computed by the borrower's worker in process, so it counts on the borrower's side; block
    moves count in full. Returns `metrics.summarize`'s figures with `refused`, the most blocks
    borrowed and lent at once, this run's COUNTERS and (`keep_timeline`) the block timeline;
    checks the ledger and that every pool is full at the end.
    """
    engine = llm.engine
    if clock == "wall":
        ticker = WallClock()
    elif clock == "parallel":
        ticker = StepClock(lambda: engine.last_step.parallel_seconds())
    else:
        raise ValueError(f"clock must be 'wall' or 'parallel', got {clock!r}")
    before = llm.cluster_stats()  # the counters are cumulative: count this run's only
    watch = BlockWatch(llm, keep_timeline)
    records, refused = run_arrivals(workload, _Online(engine), ticker, watch.on_step)
    engine.check_integrity()
    after = check_pools_whole(llm)
    out = summarize(records.values(), len(workload), slo=slo)
    out.update(refused=refused, max_borrowed_blocks=watch.max_borrowed,
               max_lent_blocks=watch.max_lent, **counter_deltas(before, after))
    if watch.timeline:
        out["timeline"] = watch.timeline
    return out


# ---- the longest context ------------------------------------------------------------------------

def refusal(engine, n: int) -> str | None:
    """The ValueError message for a prompt of `n` tokens, or None if it is admitted."""
    try:
        engine.prepare([engine.arch.vocab_size - 1] * n)
    except ValueError as e:
        return str(e)
    return None


def longest_admitted(engine) -> int:
    """The largest prompt length `engine.prepare` (the admission check) accepts; 0 if none."""
    lo, hi = 0, engine.max_model_len  # admitted(lo) holds (or lo == 0); admitted(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if refusal(engine, mid) is None:
            lo = mid
        else:
            hi = mid
    return lo


def block_holders(engine, request_id: str) -> list[int] | None:
    """The instance holding each logical block of a running request, in order; None when it
    holds no blocks (it has not started or has ended)."""
    locations = engine.block_locations(request_id)
    return None if locations is None else [holder for holder, _ in locations]


def serve_one(llm, prompt: list[int], max_tokens: int) -> dict:
    """Serve one prompt alone by stepping the engine, checking the ledger after every step;
    the most blocks borrowed and the most instances holding its blocks at once."""
    engine = llm.engine
    rid = engine.add_request(prompt, greedy(max_tokens))
    max_borrowed, max_holders, steps, out = 0, 1, 0, None
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid and o.finished:
                out = o
        steps += 1
        engine.check_integrity()
        stats = llm.cluster_stats()
        max_borrowed = max(max_borrowed, sum(i["borrowed_blocks"] for i in stats["instances"]))
        max_holders = max(max_holders, len(set(block_holders(engine, rid) or [])))
    seconds = time.perf_counter() - t0
    stats = check_pools_whole(llm)
    token_ids = list(out.outputs[0].token_ids) if out is not None else []
    return {"token_ids": token_ids, "completed": len(token_ids) == max_tokens,
            "seconds": seconds, "steps": steps, "max_borrowed_blocks": max_borrowed,
            "max_holders": max_holders, "stats": stats}
