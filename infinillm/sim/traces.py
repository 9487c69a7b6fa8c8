"""Seeded request traces for the simulated cluster: what arrives when, and how long it is.

Contract: standard library only. A trace is a list of `TraceRequest` in arrival order (arrival
times non-decreasing). `make_trace` is a pure function of its arguments; `load_trace` /
`write_trace` read and write the JSONL form; `resolve_trace` turns a CLI spec (a kind name or a
.jsonl path) into a trace; `describe` summarises one for printing.

Arrivals: with `rate` (req/s), a Poisson process. The gaps are drawn once, exponential with mean 1,
from their own stream, and divided by the rate: every rate sees the same requests in the same
order, and `arrival_s * rate` is the same at every rate. The first request arrives after one gap.
Without a rate every request arrives at 0 s (offline). Lengths come from a second stream, one
request at a time, so the first k requests of a trace of n are the trace of k.

Lengths are drawn as real numbers and rounded to the nearest integer, at least 1. A log-normal
with mean m and log-space spread s has mu = ln(m) - s^2 / 2, so its mean is exactly m (the
rounding moves it by far less than the tests' tolerance). Prompt and output are independent.

`short` (ShareGPT-like chat). Source: Kwon et al., "Efficient Memory Management for Large
Language Model Serving with PagedAttention" (vLLM, SOSP 2023), Fig. 11: ShareGPT (first round of
each conversation, OPT tokenizer) has mean input 161.31 tokens and mean output 337.99 tokens.
We reproduced both means exactly from the authors' artifact (github sosp-ae-39/sosp-ae-astra,
datasets/sharegpt_opt_text_completion_length.pkl: 84,226 (input, output) length pairs, of which
79,731 have input + output <= 2048, the filter of its astra/benchmark/trace.py). The paper gives
no spread; we measured it on those 79,731 pairs: the standard deviation of ln(length) is 1.522
for inputs and 1.144 for outputs (medians 35 and 271 tokens, p99 1464 and 1280; the log lengths
correlate at 0.18, which we ignore). Distribution: prompt ~ log-normal(mean 161.31, s 1.522),
output ~ log-normal(mean 337.99, s 1.144). Unlike the filtered set the tail is not cut at 2048
(about 3 % of requests exceed 2048 tokens in all; the unfiltered ShareGPT set has inputs up to
162,307 tokens); pass `max_context` to cap it.

`long` (L-Eval-like long-document tasks). Source: An et al., "L-Eval: Instituting Standardized
Evaluation for Long Context Language Models" (arXiv 2307.11088), Table 1, as shown in
figs/data.png of github OpenLMLab/LEval (added in commit c7cf705, 2023-10-09; lengths in tokens,
"3k-200k tokens" in its README). Per task, the average document length in tokens (Avg len) and
the number of instructions (#Instr):

    closed-ended: TOEFL 3,907 (269)  GSM(16-shot) 5,557 (100)  QuALITY 7,169 (202)
                  Coursera 9,075 (172)  TopicRet 12,506 (150)  SFiction 16,381 (64)
                  CodeU 31,575 (90)
    open-ended:   MultiDoc2Dial 3,905 (136)  Qasper 5,019 (160)  LongFQA 6,032 (52)
                  NQ 23,698 (104)  CUAD 30,966 (130)  NarrativeQA 62,335 (182)
                  Multi-News 7,320 (11)  GovReport 7,495 (13)  BigPatent 7,718 (13)
                  SummScreen 10,688 (13)  Openreview 11,170 (60)  QMSum 16,692 (156)
                  SPACE 19,978 (120)

Each instruction is one request over its document: a request picks a task with probability
#Instr / 2,197, then prompt ~ log-normal(mean Avg len, s 0.35). The prompt is the document; the
instruction itself (tens of words) is left out. The spread 0.35 is our measurement: the pooled
within-task standard deviation of ln(document words) over the 18 tasks whose files we could read
(LEval-data at commit cd34b05; CodeU and NarrativeQA were not available to us). Table 1's Max len
is not used, so a draw can exceed its task's maximum. Mean prompt: 16,364.78 tokens.

Outputs are short. Open-ended tasks: the LEval README of July 2023 (commits cd1cfc3 to 5f61592)
says "For generation tasks, the average word length of reference is 95" and that tokens "should
be 1.5x longer" than words: mean 95 x 1.5 = 142.5 tokens. Closed-ended tasks (option letters,
numbers, topics, true/false) publish no output length: we counted 4.34 words per reference
answer over 957 instructions of 6 closed-ended tasks (LEval-data at cd34b05, CodeU not
counted), x 1.5 = 6.5 tokens. (Our count over 12 open-ended tasks is 65.9 words, below the
published 95; we use the published number.) Output ~ log-normal(mean 6.5 closed / 142.5 open,
s 0.5; the 0.5 is our assumption). Mean output: (1,047 x 6.5 + 1,150 x 142.5) / 2,197 = 77.69
tokens.

`mixed` (production-like mix). Our choice, not a published trace: each request is, independently,
a `long` request with probability 0.1 and a `short` one otherwise, so prompts range from a few
tokens to over 100,000 (the Infinite-LLM paper's motivation: lengths spanning orders of
magnitude). Mean prompt 0.9 x 161.31 + 0.1 x 16,364.78 = 1,781.66 tokens; mean output
0.9 x 337.99 + 0.1 x 77.69 = 311.96 tokens.

`max_context` caps prompt_tokens + output_tokens of every request: the prompt is cut first,
keeping at least 1 token; if the output alone exceeds max_context - 1 it is cut to that. Caps
apply after drawing, so a capped trace has the same requests, shortened.

JSONL form (`load_trace` / `write_trace`): one request a line,
`{"arrival_s": float, "prompt_tokens": int, "output_tokens": int}`, exactly these keys; blank
lines are skipped. arrival_s is a finite number >= 0 (not a bool), token counts are integers >= 1,
and arrivals must be non-decreasing (a file is not sorted for you: an out-of-order line is
reported, since sorting would hide a broken generator). Every error is a ValueError naming the
file, the line number and the bad value.

`describe` percentiles are nearest rank (bench/lib/metrics.py's definition): the q-th percentile
of n values is sorted(values)[ceil(q * n / 100) - 1], a value that occurs in the trace.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TRACE_KINDS = ("short", "long", "mixed")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float  # seconds after the run starts
    prompt_tokens: int
    output_tokens: int


# ShareGPT (module docstring): means from the vLLM paper, log-space spreads measured by us.
SHAREGPT_PROMPT_MEAN, SHAREGPT_PROMPT_LOG_SD = 161.31, 1.522
SHAREGPT_OUTPUT_MEAN, SHAREGPT_OUTPUT_LOG_SD = 337.99, 1.144

# L-Eval Table 1: (task, closed-ended?, Avg len tokens, #Instr).
LEVAL_TASKS = (
    ("TOEFL", True, 3907, 269), ("GSM(16-shot)", True, 5557, 100),
    ("QuALITY", True, 7169, 202), ("Coursera", True, 9075, 172),
    ("TopicRet", True, 12506, 150), ("SFiction", True, 16381, 64),
    ("CodeU", True, 31575, 90),
    ("MultiDoc2Dial", False, 3905, 136), ("Qasper", False, 5019, 160),
    ("LongFQA", False, 6032, 52), ("NQ", False, 23698, 104), ("CUAD", False, 30966, 130),
    ("NarrativeQA", False, 62335, 182), ("Multi-News", False, 7320, 11),
    ("GovReport", False, 7495, 13), ("BigPatent", False, 7718, 13),
    ("SummScreen", False, 10688, 13), ("Openreview", False, 11170, 60),
    ("QMSum", False, 16692, 156), ("SPACE", False, 19978, 120),
)
LEVAL_PROMPT_LOG_SD = 0.35
LEVAL_OUTPUT_MEAN_CLOSED, LEVAL_OUTPUT_MEAN_OPEN, LEVAL_OUTPUT_LOG_SD = 6.5, 142.5, 0.5
MIXED_LONG_FRACTION = 0.1

_LEVAL_CUM_WEIGHTS = tuple(
    sum(t[3] for t in LEVAL_TASKS[: i + 1]) for i in range(len(LEVAL_TASKS))
)
_KEYS = ("arrival_s", "prompt_tokens", "output_tokens")


def expected_means(kind: str) -> tuple[float, float]:
    """The documented (prompt, output) mean token counts of `kind`, before rounding and caps."""
    if kind == "short":
        return SHAREGPT_PROMPT_MEAN, SHAREGPT_OUTPUT_MEAN
    if kind == "long":
        total = _LEVAL_CUM_WEIGHTS[-1]
        prompt = sum(avg * n for _, _, avg, n in LEVAL_TASKS) / total
        output = sum(n * (LEVAL_OUTPUT_MEAN_CLOSED if closed else LEVAL_OUTPUT_MEAN_OPEN)
                     for _, closed, _, n in LEVAL_TASKS) / total
        return prompt, output
    if kind == "mixed":
        (sp, so), (lp, lo) = expected_means("short"), expected_means("long")
        f = MIXED_LONG_FRACTION
        return (1 - f) * sp + f * lp, (1 - f) * so + f * lo
    raise ValueError(f"trace kind must be one of {TRACE_KINDS}, got {kind!r}")


def make_trace(kind: str, num_requests: int, *, rate: float | None, seed: int,
               max_context: int | None = None) -> list[TraceRequest]:
    """`num_requests` seeded requests of `kind` in arrival order (module docstring)."""
    if kind not in TRACE_KINDS:
        raise ValueError(f"trace kind must be one of {TRACE_KINDS}, got {kind!r}")
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 0:
        raise ValueError(f"num_requests must be an integer >= 0, got {num_requests!r}")
    _check_rate(rate)
    _check_max_context(max_context)
    lengths_rng = random.Random(f"trace-{kind}-{seed}-lengths")
    gaps_rng = random.Random(f"trace-{seed}-gaps")
    draw = {"short": _draw_short, "long": _draw_long, "mixed": _draw_mixed}[kind]
    at, trace = 0.0, []
    for _ in range(num_requests):
        prompt, output = _cap(*draw(lengths_rng), max_context)
        if rate is not None:
            at += gaps_rng.expovariate(1.0)
        trace.append(TraceRequest(at / rate if rate is not None else 0.0, prompt, output))
    return trace


def _lognormal(rng: random.Random, mean: float, log_sd: float) -> int:
    """A log-normal draw of the given mean, rounded, at least 1."""
    return max(1, round(rng.lognormvariate(math.log(mean) - log_sd * log_sd / 2, log_sd)))


def _draw_short(rng: random.Random) -> tuple[int, int]:
    return (_lognormal(rng, SHAREGPT_PROMPT_MEAN, SHAREGPT_PROMPT_LOG_SD),
            _lognormal(rng, SHAREGPT_OUTPUT_MEAN, SHAREGPT_OUTPUT_LOG_SD))


def _draw_long(rng: random.Random) -> tuple[int, int]:
    _, closed, avg_len, _ = rng.choices(LEVAL_TASKS, cum_weights=_LEVAL_CUM_WEIGHTS)[0]
    out_mean = LEVAL_OUTPUT_MEAN_CLOSED if closed else LEVAL_OUTPUT_MEAN_OPEN
    return (_lognormal(rng, avg_len, LEVAL_PROMPT_LOG_SD),
            _lognormal(rng, out_mean, LEVAL_OUTPUT_LOG_SD))


def _draw_mixed(rng: random.Random) -> tuple[int, int]:
    return _draw_long(rng) if rng.random() < MIXED_LONG_FRACTION else _draw_short(rng)


def _cap(prompt: int, output: int, max_context: int | None) -> tuple[int, int]:
    """Cut the prompt (to >= 1 token), then the output, until the two fit max_context."""
    if max_context is None or prompt + output <= max_context:
        return prompt, output
    output = min(output, max_context - 1)
    return max(1, max_context - output), output


def _check_rate(rate: float | None) -> None:
    if rate is None:
        return
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
            math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0 (req/s) or None, got {rate!r}")


def _check_max_context(max_context: int | None) -> None:
    if max_context is None:
        return
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
        raise ValueError(f"max_context must be an integer >= 2 or None, got {max_context!r}")


def load_trace(path: str | os.PathLike) -> list[TraceRequest]:
    """Read a JSONL trace (module docstring); ValueError names the file, line and value."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise ValueError(f"cannot read trace file {os.fspath(path)!r}: {e.strerror}") from e
    trace: list[TraceRequest] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        request = _parse_line(line, f"{os.fspath(path)}:{lineno}")
        if trace and request.arrival_s < trace[-1].arrival_s:
            raise ValueError(f"{os.fspath(path)}:{lineno}: arrival_s {request.arrival_s!r} is "
                             f"before the previous line's {trace[-1].arrival_s!r}; arrivals must "
                             "be non-decreasing")
        trace.append(request)
    return trace


def _parse_line(line: str, where: str) -> TraceRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}): {line.strip()[:80]!r}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {obj!r}")
    if set(obj) != set(_KEYS):
        missing, extra = sorted(set(_KEYS) - set(obj)), sorted(set(obj) - set(_KEYS))
        raise ValueError(f"{where}: keys must be exactly {list(_KEYS)}; "
                         f"missing {missing}, extra {extra}")
    arrival = obj["arrival_s"]
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not (
            math.isfinite(arrival) and arrival >= 0):
        raise ValueError(f"{where}: arrival_s must be a finite number >= 0, got {arrival!r}")
    for key in _KEYS[1:]:
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return TraceRequest(float(arrival), obj["prompt_tokens"], obj["output_tokens"])


def write_trace(path: str | os.PathLike, requests: Iterable[TraceRequest]) -> None:
    """Write `requests` as JSONL, one a line; load_trace reads back the same requests."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({"arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
                                "output_tokens": r.output_tokens}) + "\n")


def describe(requests: Sequence[TraceRequest]) -> dict:
    """What a trace holds: counts, token statistics, and its arrival span (None when empty).

    Keys: num_requests; prompt_tokens_{mean,p50,p99,max} and output_tokens_{...} (nearest-rank
    percentiles); total_tokens (prompt + output over all requests); duration_s (last arrival
    minus first, 0 for an offline trace).
    """
    stats: dict = {"num_requests": len(requests)}
    for key in _KEYS[1:]:
        values = sorted(getattr(r, key) for r in requests)
        stats[f"{key}_mean"] = sum(values) / len(values) if values else None
        stats[f"{key}_p50"] = percentile(values, 50)
        stats[f"{key}_p99"] = percentile(values, 99)
        stats[f"{key}_max"] = values[-1] if values else None
    stats["total_tokens"] = sum(r.prompt_tokens + r.output_tokens for r in requests)
    stats["duration_s"] = requests[-1].arrival_s - requests[0].arrival_s if requests else None
    return stats


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank (module docstring): the smallest value with at least q % of the values at or
    below it; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered) / 100) - 1))]


def resolve_trace(spec: str, num_requests: int | None, rate: float | None, seed: int,
                  max_context: int | None) -> list[TraceRequest]:
    """A trace from a kind name (generated) or a .jsonl path (read).

    A kind needs num_requests. A file's arrivals are used as they are, so `rate` must be None
    (rescaling would silently change a recorded trace); `num_requests` takes its first requests
    (None: all; more than the file holds is an error); `max_context` caps them as for a kind.
    `seed` is unused for a file.
    """
    if spec in TRACE_KINDS:
        if num_requests is None:
            raise ValueError(f"trace kind {spec!r} needs num_requests, got None")
        return make_trace(spec, num_requests, rate=rate, seed=seed, max_context=max_context)
    if not os.path.isfile(spec):
        raise ValueError(f"trace must be one of {TRACE_KINDS} or an existing .jsonl file, "
                         f"got {spec!r}")
    if rate is not None:
        raise ValueError(f"trace file {spec!r} carries its own arrival times; rate must be None, "
                         f"got {rate!r}")
    _check_max_context(max_context)
    trace = load_trace(spec)
    if num_requests is not None:
        if num_requests < 0 or num_requests > len(trace):
            raise ValueError(f"num_requests must be in [0, {len(trace)}] for {spec!r} "
                             f"({len(trace)} requests), got {num_requests}")
        trace = trace[:num_requests]
    return [TraceRequest(r.arrival_s, *_cap(r.prompt_tokens, r.output_tokens, max_context))
            for r in trace]
