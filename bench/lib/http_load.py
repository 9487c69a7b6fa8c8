"""The load side of an OpenAI-compatible server benchmark: streamed completion calls sent at
their arrival times, and the per-run figures. Standard library plus httpx; knows nothing about
which server it talks to.

Contract:
- `run_load` sends each request of a workload (`workloads.Arrival`) at its time after the start,
  streaming, and stops at `duration_cap` seconds: requests still streaming then are cancelled
  ("cut"; the server sees the client leave), requests not sent yet are never sent ("unsent").
  `send_one(..., leave_after=k)` is one request whose client leaves after k text chunks (also
  "cut").
- Times in a `StreamRecord` are seconds from the start of the run. TTFT = first chunk with text -
  send; TPOT = (end - first text) / (output tokens - 1), with end when `[DONE]` arrives; latency
  = end - send. Output tokens are the server's `usage`. Percentiles: `metrics.percentile`.
- `summarize_streams` reports milliseconds, under the key names serving_vs_vllm.py prints.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from bench.lib.metrics import RequestRecord, summarize
from bench.lib.workloads import Arrival


@dataclass(slots=True)
class StreamRecord:
    """What one request did; filled in as its stream arrives, so a cancelled one keeps it."""

    request: Arrival
    sent_s: float | None = None
    first_text_s: float | None = None
    end_s: float | None = None
    num_chunks: int = 0
    output_len: int | None = None  # from usage
    error: str | None = None
    text_parts: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        if self.end_s is not None:
            return "ok"
        return "cut" if self.sent_s is not None else "unsent"

    @property
    def num_tokens(self) -> int:
        """Output tokens: the server's usage count, else (no usage chunk) the text chunks."""
        return self.output_len if self.output_len is not None else self.num_chunks

    def as_request_record(self) -> RequestRecord:
        """For `metrics.summarize`: arrival is the send time; only a completed stream ends."""
        return RequestRecord(self.sent_s or 0.0, len(self.request.prompt_ids),
                             self.request.max_new, self.first_text_s,
                             self.end_s if self.status == "ok" else None, self.num_tokens)


def completion_body(model: str, req: Arrival) -> dict:
    """A streamed greedy completion that makes exactly `max_new` tokens (ignore_eos)."""
    return {"model": model, "prompt": req.prompt_ids, "max_tokens": req.max_new,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def send_one(client: httpx.AsyncClient, model: str, rec: StreamRecord, t0: float,
                   leave_after: int | None = None) -> None:
    """Send `rec`'s request at its time and read its stream; with `leave_after`, the client
    leaves (closes the connection) once that many text chunks have come, and the record stays
    "cut"."""
    await asyncio.sleep(max(0.0, t0 + rec.request.at_s - time.perf_counter()))
    rec.sent_s = time.perf_counter() - t0
    try:
        async with client.stream("POST", "/v1/completions",
                                 json=completion_body(model, rec.request)) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return
            async for line in resp.aiter_lines():
                if _on_event(rec, line, t0):
                    break
                if leave_after is not None and rec.num_chunks >= leave_after:
                    return
    except (httpx.HTTPError, ValueError) as e:  # ValueError: an event that is not JSON
        rec.error = f"{type(e).__name__}: {e}"
        return
    if rec.error is None and rec.end_s is None:
        rec.error = "stream ended without [DONE]"


def _on_event(rec: StreamRecord, line: str, t0: float) -> bool:
    """Take one SSE line; True when the stream is over ([DONE] or an error event)."""
    if not line.startswith("data:"):
        return False
    payload = line[5:].strip()
    if payload == "[DONE]":
        rec.end_s = time.perf_counter() - t0
        return True
    event = json.loads(payload)
    if "error" in event:
        rec.error = f"error event: {event['error']}"
        return True
    choices = event.get("choices") or []
    text = choices[0].get("text") if choices else None
    if text:
        if rec.first_text_s is None:
            rec.first_text_s = time.perf_counter() - t0
        rec.num_chunks += 1
        rec.text_parts.append(text)
    usage = event.get("usage")
    if usage:
        rec.output_len = usage.get("completion_tokens")
    return False


async def run_load(base_url: str, model: str, workload: list[Arrival],
                   duration_cap: float) -> tuple[list[StreamRecord], float]:
    """Send the workload; returns the records and the run's span in seconds (start to the last
    completion, or the cap when requests were cut or never sent)."""
    records = [StreamRecord(r) for r in workload]
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
    ends = [r.end_s for r in records if r.end_s is not None]
    return records, max(ends) if ends else time.perf_counter() - t0


def summarize_streams(records: list[StreamRecord], span: float) -> dict:
    """Per-run figures over the completed requests (but `streamed_tokens_per_s`), times in ms.
    `mean_in_flight` is the summed latency over the span: about how many requests the server
    held at once (its batch, when it keeps up)."""
    figures = summarize([r.as_request_record() for r in records], len(records), duration_s=span)
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "error", "cut", "unsent")}
    done = [r for r in records if r.status == "ok"]
    summary = {
        "completed": counts["ok"], "errors": counts["error"], "cut": counts["cut"],
        "unsent": counts["unsent"], "span_s": span,
        "request_throughput": figures["req_s"], "output_tokens_per_s": figures["output_tok_s"],
        "output_tokens": figures["generated_tokens"],
        # cut streams too: what the server produced in the span, even when it fell behind
        "streamed_tokens_per_s": sum(r.num_tokens for r in records) / span,
        "short_outputs": sum(r.num_tokens != r.request.max_new for r in done),
        "mean_in_flight": sum(r.end_s - r.sent_s for r in done) / span,
    }
    for name in ("ttft", "tpot", "latency"):
        for q in (50, 99):
            p = figures[f"{name}_p{q}_s"]
            summary[f"{name}_p{q}_ms"] = None if p is None else p * 1e3
    summary["first_errors"] = [r.error for r in records if r.error][:3]
    return summary


def texts(records: list[StreamRecord]) -> list[str | None]:
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
