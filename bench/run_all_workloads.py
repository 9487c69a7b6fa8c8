"""Seeded online workloads for bench/run_all.py and the loop serving one on an in-process engine.

Contract: `make_workload` is pure (same arguments, same requests); `serve_online` drives
`LLM(...).engine` directly with Poisson arrivals on a wall or a parallel clock and returns plain
numbers (JSON-ready); `summarize` turns per-request records into those numbers for any engine
(bench/vllm_online.py uses it too). Standard library only, so that .venv-vllm can import it.

Workloads, modelled on the paper's traces and scaled to one small CPU model:
- `short`: prompts uniform in [100, 400] tokens (ShareGPT-like chat).
- `mixed`: mostly short, about one request in six long (600-2400 tokens: some exceed one
  instance's pool, as in the paper's production trace).
- `long`: prompt lengths log-uniform over two orders of magnitude, 30-3000 tokens (L-Eval-like).
Every request asks for a number of new tokens uniform in [min_new, max_new], greedy, ignore_eos.
Inter-arrival gaps are drawn once per workload (exponential, mean 1) and divided by the rate, so
every rate and every system sees the same prompts in the same order.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from common import seeded_prompts

WORKLOADS = ("short", "mixed", "long")
COUNTERS = ("preemptions", "remote_attention_calls", "remote_bytes", "migrations")


@dataclass(frozen=True, slots=True)
class Arrival:
    at_s: float  # seconds after the run starts
    prompt_ids: list[int]
    max_new: int


def prompt_lens(kind: str, n: int, rng: random.Random) -> list[int]:
    """Prompt lengths of workload `kind` (see the module docstring)."""
    if kind == "short":
        return [rng.randint(100, 400) for _ in range(n)]
    if kind == "mixed":
        num_long = max(2, n // 6)
        lens = [rng.randint(600, 2400) for _ in range(num_long)]
        lens += [rng.randint(100, 400) for _ in range(n - num_long)]
        rng.shuffle(lens)
        return lens
    if kind == "long":
        return [int(math.exp(rng.uniform(math.log(30), math.log(3000)))) for _ in range(n)]
    raise ValueError(f"workload must be one of {WORKLOADS}, got {kind!r}")


def make_workload(kind: str, n: int, rate: float, vocab_size: int, min_new: int, max_new: int,
                  seed: int) -> list[Arrival]:
    """`n` seeded requests of workload `kind` arriving as a Poisson process of `rate` req/s."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(f"{seed}-{kind}")
    lens = prompt_lens(kind, n, rng)
    prompts = [seeded_prompts(vocab_size, 1, k, k, seed=rng.randrange(2**31))[0] for k in lens]
    news = [rng.randint(min_new, max_new) for _ in range(n)]
    at, arrivals = 0.0, []
    for prompt, new in zip(prompts, news, strict=True):
        at += rng.expovariate(1.0)
        arrivals.append(Arrival(at / rate, prompt, new))
    return arrivals


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


CLOCKS = ("wall", "parallel")


class InstanceTimer:
    """Per-instance execute seconds of the step in flight, by wrapping each in-process worker.

    The parallel clock of `serve_online`: a step of N instances that each had their own device
    would take the driver's share (everything but the workers) plus its slowest instance.
    """

    def __init__(self, engine) -> None:
        workers = getattr(getattr(engine, "executor", None), "workers", None)
        if not isinstance(workers, dict):
            raise ValueError("the parallel clock needs the in-process executor (executor='inproc')")
        self.current: dict[int, float] = {}
        self.computed_tokens = 0  # every token the workers ran: prefill, decode and recompute
        for iid, worker in workers.items():
            worker.execute = self._wrap(iid, worker.execute)

    def _wrap(self, iid, fn):
        def timed(plan):
            self.computed_tokens += sum(len(c.token_ids) for c in plan.chunks)
            t0 = time.perf_counter()
            try:
                return fn(plan)
            finally:
                self.current[iid] = self.current.get(iid, 0.0) + time.perf_counter() - t0
        return timed

    def take_slowest(self) -> float:
        """The slowest instance's execute seconds since the last take; resets."""
        slowest = max(self.current.values(), default=0.0)
        self.current.clear()
        return slowest

    def parallel_seconds(self, step_wall_s: float) -> float:
        """`step_wall_s` with the instances run side by side instead of in turn; resets."""
        total = sum(self.current.values())
        return step_wall_s - total + self.take_slowest()


def serve_online(llm, workload: list[Arrival], sampling_cls, keep_timeline: bool,
                 clock: str = "wall", slo: tuple[float, float] | None = None) -> dict:
    """Add each request at its arrival time, step until all are done; per-request times.

    TTFT is from the scheduled arrival (not from `add_request`, which waits for the step in
    flight) to the end of the step that sampled the first token; TPOT is (end - first token) /
    (tokens - 1). A prompt the engine cannot serve raises ValueError at admission: counted as
    refused. With `keep_timeline`, block counts per instance after every step.

    `clock="wall"` times the run as it happens on this machine, where the instances of a step run
    one after another. `clock="parallel"` models one device per instance: time advances by each
    step's driver time plus its slowest instance (`InstanceTimer`), arrivals follow that clock,
    and idle gaps are skipped instead of slept. Remote attention is computed by the borrower's
    worker in-process, so it counts on the borrower's side; block moves count in full.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    engine = llm.engine
    timer = InstanceTimer(engine) if clock == "parallel" else None
    before = llm.cluster_stats()  # the counters are cumulative: count this run's only
    meta: dict[str, dict] = {}
    refused = next_i = 0
    timeline, max_borrowed, max_lent = [], 0, 0
    t0 = time.perf_counter()
    virtual = 0.0
    while next_i < len(workload) or engine.has_unfinished_requests():
        now = virtual if timer else time.perf_counter() - t0
        while next_i < len(workload) and workload[next_i].at_s <= now:
            a = workload[next_i]
            next_i += 1
            params = sampling_cls(max_tokens=a.max_new, temperature=0.0, ignore_eos=True)
            try:
                rid = engine.add_request(a.prompt_ids, params)
            except ValueError:
                refused += 1
                continue
            meta[rid] = new_record(a)
        if not engine.has_unfinished_requests():
            if next_i < len(workload):
                if timer:
                    virtual = max(virtual, workload[next_i].at_s)
                else:
                    time.sleep(max(0.0, workload[next_i].at_s - now))
            continue
        started = time.perf_counter()
        outs = engine.step()
        if timer:
            virtual += timer.parallel_seconds(time.perf_counter() - started)
            now = virtual
        else:
            now = time.perf_counter() - t0
        record_outputs(meta, outs, now)
        stats = llm.cluster_stats()["instances"]
        max_borrowed = max(max_borrowed, sum(i["borrowed_blocks"] for i in stats))
        max_lent = max(max_lent, sum(i["lent_blocks"] for i in stats))
        if keep_timeline:
            timeline.append([round(now, 3)] + [[i["used_blocks"], i["lent_blocks"],
                                                i["borrowed_blocks"], i["free_blocks"]]
                                               for i in stats])
    engine.check_integrity()
    after = llm.cluster_stats()
    return summarize(meta, workload, refused, before, after, max_borrowed, max_lent, timeline,
                     slo=slo)


def new_record(a: Arrival) -> dict:
    """The per-request record `summarize` reads, for a request just admitted."""
    return {"arrival": a.at_s, "first": None, "end": None, "tokens": 0, "max_new": a.max_new,
            "prompt_len": len(a.prompt_ids)}


def record_outputs(meta: dict[str, dict], outs, now: float) -> None:
    """Note one step's outputs (vLLM-shaped RequestOutputs, cumulative token ids) at `now`."""
    for o in outs:
        m = meta[o.request_id]
        m["tokens"] = len(o.outputs[0].token_ids)
        if m["first"] is None and m["tokens"]:
            m["first"] = now
        if o.finished:
            m["end"] = now


def summarize(meta: dict[str, dict], workload: list[Arrival], refused: int, before: dict,
              after: dict, max_borrowed: int, max_lent: int, timeline: list,
              slo: tuple[float, float] | None = None) -> dict:
    """The figures of one run from per-request records.

    `meta` maps a request id to {"arrival", "first", "end", "tokens", "max_new", "prompt_len"}
    (seconds from the run's start; "first"/"end" None while unfinished). `before`/`after` hold
    the cumulative COUNTERS at the start and end (all 0 for an engine without them). With
    `slo = (ttft_s, tpot_s)`, a served request meets it when its TTFT and TPOT are both within;
    `goodput_tok_s` counts only those requests' output tokens, and `slo_attainment` is their share
    of all submitted requests (a refused request misses).
    """
    done = [m for m in meta.values() if m["end"] is not None]
    ttft = [m["first"] - m["arrival"] for m in done]
    tpot = [(m["end"] - m["first"]) / (m["tokens"] - 1) for m in done if m["tokens"] > 1]
    duration = max((m["end"] for m in done), default=0.0)  # from the run's start
    generated = sum(m["tokens"] for m in done)
    out = {"submitted": len(workload), "served": len(done), "refused": refused,
           "cut_short": sum(m["tokens"] < m["max_new"] for m in done),
           "duration_s": duration, "generated_tokens": generated,
           "output_tok_s": generated / duration if duration else 0.0,
           "served_prompt_tokens": sum(m["prompt_len"] for m in done),
           # prompt + output tokens of the served requests per second: fairer where a system
           # refuses the longest prompts (it then does less work)
           "total_tok_s": (sum(m["prompt_len"] for m in done) + generated) / duration
           if duration else 0.0,
           "req_s": len(done) / duration if duration else 0.0,
           "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
           "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
           "max_borrowed_blocks": max_borrowed, "max_lent_blocks": max_lent}
    if slo is not None:
        met = [m for m in done if _meets(m, *slo)]
        out.update(slo_ttft_s=slo[0], slo_tpot_s=slo[1],
                   slo_attainment=len(met) / len(workload) if workload else 0.0,
                   goodput_tok_s=sum(m["tokens"] for m in met) / duration if duration else 0.0)
    for key in COUNTERS:
        out[key] = after.get(key, 0) - before.get(key, 0)
    if timeline:
        out["timeline"] = timeline
    return out



def _meets(m: dict, ttft_s: float, tpot_s: float) -> bool:
    if m["first"] - m["arrival"] > ttft_s:
        return False
    return m["tokens"] <= 1 or (m["end"] - m["first"]) / (m["tokens"] - 1) <= tpot_s
