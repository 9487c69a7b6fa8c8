"""Per-request records and the figures of a run, with ONE percentile definition for all benchmarks.

Contract: standard library only (the vLLM side imports it inside .venv-vllm).

Percentile: nearest rank. The q-th percentile (q in [0, 100]) of n values is the smallest value
x with at least q % of the values <= x, i.e. sorted(values)[ceil(q * n / 100) - 1], the index
clamped to [0, n - 1] (so q = 0 gives the minimum). Every percentile reported is a value that was
measured: with fewer than 100 values p99 is the maximum, and p50 of an even count is the lower of
the two middle values. (numpy's default, linear interpolation, reports values between samples;
its p50 of an even count is the mean of the two middle values.) None for no values.

Times in a `RequestRecord` are seconds from the start of the run:
- TTFT = first token - arrival (the scheduled arrival for in-process loops, the send time over
  HTTP); TPOT = (end - first token) / (output tokens - 1), for requests with 2 tokens or more;
  latency = end - arrival.
- A request is served when it has an end. Throughputs are over the run's duration: from its start
  to the last end, unless the caller gives another (a run cut at a time cap).
- With an SLO (ttft_s, tpot_s), a served request meets it when its TTFT and its TPOT (if it has
  one) are both within; goodput counts the output tokens of those requests only, attainment is
  their share of all submitted requests (a refused or unserved request misses).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    """What one request did; filled in as its outputs arrive."""

    arrival_s: float
    prompt_len: int
    max_new: int
    first_token_s: float | None = None
    end_s: float | None = None  # None while unfinished, or when cut or failed
    num_tokens: int = 0  # output tokens so far

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.num_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.num_tokens - 1)

    def meets(self, slo: tuple[float, float]) -> bool:
        """Served, with TTFT and TPOT within `slo = (ttft_s, tpot_s)`."""
        ttft, tpot = self.ttft_s, self.tpot_s
        return (self.end_s is not None and ttft is not None and ttft <= slo[0]
                and (tpot is None or tpot <= slo[1]))


def percentile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (module docstring); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = math.ceil(q * len(ordered) / 100)  # q * n first: exact for integer q and n
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


def summarize(records: Iterable[RequestRecord], num_submitted: int,
              duration_s: float | None = None,
              slo: tuple[float, float] | None = None) -> dict:
    """The figures of one run (seconds, tokens/s), JSON-ready.

    `records` are the admitted requests; `num_submitted` counts every request of the workload.
    `duration_s` defaults to the last end (module docstring).
    """
    done = [r for r in records if r.end_s is not None]
    if duration_s is None:
        duration_s = max((r.end_s for r in done), default=0.0)
    generated = sum(r.num_tokens for r in done)
    prompt_tokens = sum(r.prompt_len for r in done)
    out = {"submitted": num_submitted, "served": len(done),
           "cut_short": sum(r.num_tokens < r.max_new for r in done),
           "duration_s": duration_s, "generated_tokens": generated,
           "output_tok_s": _per_s(generated, duration_s),
           "served_prompt_tokens": prompt_tokens,
           # prompt + output tokens of the served requests per second: fairer where a system
           # refuses the longest prompts (it then does less work)
           "total_tok_s": _per_s(prompt_tokens + generated, duration_s),
           "req_s": _per_s(len(done), duration_s)}
    series = {"ttft": [r.ttft_s for r in done], "tpot": [r.tpot_s for r in done],
              "latency": [r.end_s - r.arrival_s for r in done]}
    for name, values in series.items():
        values = [v for v in values if v is not None]
        for q in (50, 99):
            out[f"{name}_p{q}_s"] = percentile(values, q)
    if slo is not None:
        met = [r for r in done if r.meets(slo)]
        out.update(slo_ttft_s=slo[0], slo_tpot_s=slo[1],
                   slo_attainment=len(met) / num_submitted if num_submitted else 0.0,
                   goodput_tok_s=_per_s(sum(r.num_tokens for r in met), duration_s))
    return out


def _per_s(amount: float, seconds: float) -> float:
    return amount / seconds if seconds else 0.0
