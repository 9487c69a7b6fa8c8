"""Simulated runs for bench/sim_paper.py: one run as a small picklable job, the adaptive rate
grid of a (trace, instances) cell, and a process pool that runs jobs as the grids ask for them.

Contract: `run_job(Job) -> dict` runs in any process (it imports infinillm inside); a
`RateSweep` decides its next rate from its runs alone; `run_jobs` returns every result, in the
order they finished, after logging a line for each. Everything it reports is MODELLED.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field

POLICIES = ("lending", "proactive", "multi", "single")
# Throughput figures of a run (infinillm.sim.run.summarize): `loaded_*` count what the cluster
# produced while requests still arrived (no drain at the end), the others the whole run.
METRICS = {"output": "loaded_output_tokens_per_s", "goodput": "loaded_goodput_tokens_per_s",
           "output_run": "output_tokens_per_s", "goodput_run": "goodput_tokens_per_s"}
GROWTH_STOP = 1.05  # the best policy's output tokens/s must grow by 5 % for the next rate
ATTAINMENT_STOP = 0.5  # every policy below this share within the SLO: saturated


@dataclass(frozen=True, slots=True)
class Job:
    """One simulated run: a longest-context search (`kind` "context") or a trace at a rate
    ("rate"). Small and picklable: the worker builds the trace from (trace, n, rate, seed)."""

    kind: str
    model: str
    device: str
    instances: int
    policy: str
    serve: bool = False
    trace: str = ""
    rate: float = 0.0
    rate_index: int = 0
    num_requests: int = 0
    seed: int = 0
    slo: tuple[float, float] = (10.0, 0.2)

    def label(self) -> str:
        if self.kind == "context":
            return (f"context {self.model} x{self.instances} {self.policy}"
                    f"{' (served)' if self.serve else ''}")
        return (f"rate {self.trace} x{self.instances} {self.policy} @ {self.rate:.4g} req/s "
                f"({self.num_requests} req)")


def run_job(job: Job) -> dict:
    """Run `job` (in a worker process): the job's fields plus what the simulator returns."""
    from infinillm.sim.run import SimSetup, longest_context, simulate
    from infinillm.sim.traces import make_trace

    started = time.perf_counter()
    setup = SimSetup(model=job.model, device=job.device, instances=job.instances,
                     policy=job.policy)
    out = {k: v for k, v in asdict(job).items() if k not in ("slo",)}
    if job.kind == "context":
        out.update(longest_context(setup, serve=job.serve))
    else:
        trace = make_trace(job.trace, job.num_requests, rate=job.rate, seed=job.seed)
        out.update(simulate(setup, trace, slo=job.slo))
    out["wall_s"] = time.perf_counter() - started
    return out


def capacity_estimate(model: str, device: str, instances: int, trace: str,
                      max_num_seqs: int = 256, chunk: int = 2048) -> float:
    """Requests/s that `instances` one-device instances can roughly sustain on `trace`: one
    instance's time per request is its prefill (chunked linear layers plus causal attention)
    plus its share of decode steps at the batch its KV pool holds (at most `max_num_seqs`), at
    the trace's mean lengths. Only the grid's starting point: it ignores queueing, the length
    spread and everything the control plane does."""
    from infinillm.model import load_arch
    from infinillm.sim.cost import AttentionWork, CostModel
    from infinillm.sim.devices import load_profile
    from infinillm.sim.models import sim_model_folder
    from infinillm.sim.traces import expected_means

    arch = load_arch(sim_model_folder(model))
    cost = CostModel(arch, 2, 16, load_profile(device))
    prompt, output = expected_means(trace)
    batch = max(1, min(max_num_seqs, cost.kv_blocks() * 16 // int(prompt + output)))
    context = prompt + output / 2
    decode = cost.linear_seconds(batch, batch) + cost.attention_seconds(AttentionWork(
        kv_bytes=batch * context * cost.kv_token_bytes, calls=batch))
    prefill = cost.linear_seconds(chunk, 1) * prompt / chunk + cost.attention_seconds(
        AttentionWork(kv_bytes=prompt * cost.kv_token_bytes,
                      flops=2 * arch.num_heads * arch.head_dim * prompt * prompt,
                      calls=math.ceil(prompt / chunk), max_rows=int(min(prompt, chunk))))
    return instances / (prefill + output * decode / batch)


@dataclass(slots=True)
class RateSweep:
    """The rate grid of one (trace, instances) cell: every policy at one rate, then the next.

    Upward (from the first rate): double while the cluster is not saturated (`_go_on_up`).
    If at the first rate every policy is already below ATTAINMENT_STOP, the start was too
    high: halve instead, until some policy meets the SLO (`attainment` of its requests).
    `fixed`: the given rates, in order, nothing decided."""

    trace: str
    instances: int
    template: Job  # model, device, seed, slo, num_requests
    rates: list[float]  # in the order they ran
    max_rates: int
    attainment: float = 0.9
    fixed: bool = False
    runs: dict[tuple[int, str], dict] = field(default_factory=dict)  # (rate index, policy)
    stop_reason: str = ""
    downward: bool = False

    def jobs(self, index: int) -> list[Job]:
        t = self.template
        return [Job("rate", t.model, t.device, self.instances, p, trace=self.trace,
                    rate=self.rates[index], rate_index=index, num_requests=t.num_requests,
                    seed=t.seed, slo=t.slo) for p in POLICIES]

    def add(self, result: dict) -> list[Job]:
        """Record a run; the next rate's jobs once every policy has run at this one."""
        index = result["rate_index"]
        self.runs[index, result["policy"]] = result
        if any((index, p) not in self.runs for p in POLICIES):
            return []
        nxt = self._next_rate(index)
        if nxt is None:
            return []
        if not self.fixed:
            self.rates.append(nxt)
        return self.jobs(index + 1)

    def _next_rate(self, index: int) -> float | None:
        if index + 1 >= (len(self.rates) if self.fixed else self.max_rates):
            self.stop_reason = "last rate of the grid"
            return None
        if self.fixed:
            return self.rates[index + 1]
        now = [self.runs[index, p] for p in POLICIES]
        best_slo = max(r["slo_attainment"] for r in now)
        if self.downward or (index == 0 and best_slo < ATTAINMENT_STOP):
            self.downward = True
            if best_slo >= self.attainment:
                self.stop_reason = "down from a saturated start to a rate within the SLO"
                return None
            return min(self.rates) / 2
        return max(self.rates) * 2 if self._go_on_up(index, now, best_slo) else None

    def _go_on_up(self, index: int, now: list[dict], best_slo: float) -> bool:
        if best_slo < ATTAINMENT_STOP:
            self.stop_reason = f"every policy's SLO attainment < {ATTAINMENT_STOP}"
            return False
        if index > 0:
            key = METRICS["output"]
            best = max(r[key] or 0.0 for r in now)
            before = max(self.runs[index - 1, p][key] or 0.0 for p in POLICIES)
            if best < GROWTH_STOP * before:
                self.stop_reason = (f"best output tok/s grew < {GROWTH_STOP - 1:.0%} "
                                    f"({before:.4g} -> {best:.4g})")
                return False
        return True

    def results(self) -> list[dict]:
        """The runs by rate (ascending), policies in POLICIES order."""
        return sorted(self.runs.values(), key=lambda r: (r["rate"], POLICIES.index(r["policy"])))


class _InlineExecutor:
    """--jobs 1: run each job when submitted, in this process."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:  # handed back through the future, as a pool would
            future.set_exception(e)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def run_jobs(first: list[Job], sweeps: dict[tuple[str, int], RateSweep], num_jobs: int,
             log: Callable[[str], None] = print) -> list[dict]:
    """Run `first` and every job the sweeps ask for next, `num_jobs` at a time; the results in
    the order they finished. A sweep's next rate is submitted as soon as its current rate is
    done, so cells never wait for each other."""
    pool = (_InlineExecutor() if num_jobs == 1 else ProcessPoolExecutor(
        num_jobs, mp_context=multiprocessing.get_context("spawn")))
    results: list[dict] = []
    with pool:
        pending = {pool.submit(run_job, job): job for job in first}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                r = future.result()
                results.append(r)
                log(f"[{len(results)} done, {len(pending)} pending] {job.label()}: "
                    f"{_brief(r)} (wall {r['wall_s']:.1f} s)")
                if job.kind == "rate":
                    for nxt in sweeps[job.trace, job.instances].add(r):
                        pending[pool.submit(run_job, nxt)] = nxt
    return results


def _brief(r: dict) -> str:
    if r["kind"] == "context":
        return f"{r['longest_context_tokens']} tokens, served {r['served']}"
    return (f"{fmt(r['loaded_output_tokens_per_s'])} out tok/s loaded "
            f"({r['output_tokens_per_s']:.4g} over the run), goodput "
            f"{fmt(r['loaded_goodput_tokens_per_s'])}, SLO {r['slo_attainment']:.2f}")


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"
