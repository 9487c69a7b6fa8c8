"""The load side of bench/serving.py: seeded Poisson workloads, streamed completion calls, and
the per-run figures. Standard library plus httpx; knows nothing about which server it talks to.

Contract:
- `make_workload` is a pure function of its arguments: both engines get the same requests (the
  same prompt token ids, `max_tokens` and send times) for a seed and rate.
- `run_load` sends each request at its time after the start, streaming, and stops at
  `duration_cap` seconds: requests still streaming then are cancelled ("cut"; the server sees
  the client leave), requests not sent yet are never sent ("unsent").
- Times are seconds from `time.perf_counter`; `summarize` reports milliseconds.
  TTFT = first chunk with text - send; TPOT = (end - first text) / (output tokens - 1), with end
  when `[DONE]` arrives; latency = end - send. Output tokens are the server's `usage`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True, slots=True)
class LoadRequest:
    prompt_ids: list[int]
    max_tokens: int
    send_at: float  # seconds after the start of the run


@dataclass(slots=True)
class Record:
    """What one request did; filled in as its stream arrives, so a cancelled one keeps it."""

    request: LoadRequest
    sent: float | None = None
    first_text: float | None = None
    end: float | None = None
    num_chunks: int = 0
    output_len: int | None = None  # from usage
    error: str | None = None
    text_parts: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        if self.end is not None:
            return "ok"
        return "cut" if self.sent is not None else "unsent"


def make_workload(vocab_size: int, num_requests: int, rate: float, input_len: tuple[int, int],
                  output_len: tuple[int, int], seed: int, min_token_id: int) -> list[LoadRequest]:
    """`num_requests` requests arriving as a Poisson process of `rate` per second.

    Prompt lengths and `max_tokens` are uniform in the inclusive ranges; token ids uniform in
    [min_token_id, vocab_size). Each rate draws its own prompts (seeded by seed and rate), so
    that a prefix cache warmed at one rate does not make the next rate's prefills free.
    """
    if rate <= 0 or num_requests < 1:
        raise ValueError(f"need rate > 0 and num_requests >= 1, got {rate} and {num_requests}")
    rng = random.Random(f"serving-{seed}-{rate}")
    t = 0.0
    requests = []
    for _ in range(num_requests):
        n = rng.randint(*input_len)
        prompt = [rng.randrange(min_token_id, vocab_size) for _ in range(n)]
        requests.append(LoadRequest(prompt, rng.randint(*output_len), t))
        t += rng.expovariate(rate)
    return requests


def completion_body(model: str, req: LoadRequest) -> dict:
    """A streamed greedy completion that makes exactly `max_tokens` tokens (ignore_eos)."""
    return {"model": model, "prompt": req.prompt_ids, "max_tokens": req.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def send_one(client: httpx.AsyncClient, model: str, rec: Record, t0: float) -> None:
    await asyncio.sleep(max(0.0, t0 + rec.request.send_at - time.perf_counter()))
    rec.sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions",
                                 json=completion_body(model, rec.request)) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return
            async for line in resp.aiter_lines():
                if _on_event(rec, line):
                    break
    except (httpx.HTTPError, ValueError) as e:  # ValueError: an event that is not JSON
        rec.error = f"{type(e).__name__}: {e}"
        return
    if rec.error is None and rec.end is None:
        rec.error = "stream ended without [DONE]"


def _on_event(rec: Record, line: str) -> bool:
    """Take one SSE line; True when the stream is over ([DONE] or an error event)."""
    if not line.startswith("data:"):
        return False
    payload = line[5:].strip()
    if payload == "[DONE]":
        rec.end = time.perf_counter()
        return True
    event = json.loads(payload)
    if "error" in event:
        rec.error = f"error event: {event['error']}"
        return True
    choices = event.get("choices") or []
    text = choices[0].get("text") if choices else None
    if text:
        if rec.first_text is None:
            rec.first_text = time.perf_counter()
        rec.num_chunks += 1
        rec.text_parts.append(text)
    usage = event.get("usage")
    if usage:
        rec.output_len = usage.get("completion_tokens")
    return False


async def run_load(base_url: str, model: str, workload: list[LoadRequest],
                   duration_cap: float) -> tuple[list[Record], float]:
    """Send the workload; returns the records and the run's span in seconds (start to the last
    completion, or the cap when requests were cut or never sent)."""
    records = [Record(r) for r in workload]
    limits = httpx.Limits(max_connections=len(workload) + 4, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(send_one(client, model, rec, t0)) for rec in records]
        _, pending = await asyncio.wait(tasks, timeout=duration_cap)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        return records, duration_cap
    ends = [r.end for r in records if r.end is not None]
    return records, (max(ends) - t0) if ends else time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: list[Record], span: float) -> dict:
    """Per-run figures over the completed requests (but `streamed_tokens_per_s`).
    `mean_in_flight` is the summed latency over the span: about how many requests the server
    held at once (its batch, when it keeps up)."""
    done = [r for r in records if r.status == "ok"]
    ttft = [r.first_text - r.sent for r in done if r.first_text is not None]
    tpot = [(r.end - r.first_text) / (_tokens(r) - 1) for r in done
            if r.first_text is not None and _tokens(r) > 1]
    latency = [r.end - r.sent for r in done]
    out_tokens = sum(_tokens(r) for r in done)
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "error", "cut", "unsent")}
    summary = {
        "completed": counts["ok"], "errors": counts["error"], "cut": counts["cut"],
        "unsent": counts["unsent"], "span_s": span,
        "request_throughput": counts["ok"] / span, "output_tokens_per_s": out_tokens / span,
        "output_tokens": out_tokens,
        # cut streams too: what the server produced in the span, even when it fell behind
        "streamed_tokens_per_s": sum(_tokens(r) for r in records) / span,
        "short_outputs": sum(_tokens(r) != r.request.max_tokens for r in done),
        "mean_in_flight": sum(latency) / span,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("latency", latency)):
        for q in (50, 99):
            p = percentile(values, q)
            summary[f"{name}_p{q}_ms"] = None if p is None else p * 1e3
    summary["first_errors"] = [r.error for r in records if r.error][:3]
    return summary


def _tokens(rec: Record) -> int:
    """Output tokens: the server's usage count, else (no usage chunk) the text chunks seen."""
    return rec.output_len if rec.output_len is not None else rec.num_chunks


def texts(records: list[Record]) -> list[str | None]:
    """The full text of each completed request (None otherwise), in workload order."""
    return ["".join(r.text_parts) if r.status == "ok" else None for r in records]


async def num_busy(client: httpx.AsyncClient, metric_names: tuple[str, ...]) -> float:
    """Requests the server holds (running + waiting), summed from its Prometheus /metrics."""
    body = (await client.get("/metrics")).text
    total = 0.0
    for line in body.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in metric_names:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_idle(base_url: str, metric_names: tuple[str, ...], timeout: float = 60.0) -> bool:
    """Wait until the server holds no request (cut streams are aborted a step later)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if await num_busy(client, metric_names) == 0:
                return True
            await asyncio.sleep(0.5)
    return False
