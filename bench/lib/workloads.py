"""Seeded workloads: every request a benchmark sends, as `Arrival`s from one `make_workload`.

Contract: standard library only (the vLLM side imports it inside .venv-vllm). `make_workload` is
a pure function of its arguments: the same arguments give the same requests, whichever engine
serves them. Token ids are uniform in [MIN_REGULAR_TOKEN_ID, vocab_size).

Kinds and their prompt lengths (tokens); every request asks for `max_new` new tokens uniform in
`new_tokens = (lo, hi)`, and benchmarks send them greedy with ignore_eos:
- `offline`: uniform in `prompt_len` (default 32-40): the offline-throughput prompt set, the same
  prompts as `seeded_prompts(vocab_size, n, *prompt_len, seed)`.
- `short`: uniform in [100, 400] (ShareGPT-like chat).
- `mixed`: about one request in six long (uniform in [600, 2400]: some exceed one instance's
  pool, as in the paper's production trace) shuffled among short ones.
- `long`: log-uniform over two orders of magnitude, 30-3000 (L-Eval-like).
- `over` / `fair`: `num_long` long prompts among short ones (uniform in `short_len`), for a
  cluster whose pools hold `pool_tokens` each. `over`: long prompts uniform in
  `long_frac` x pool, so some exceed any single pool; `fair`: the same draw capped at
  pool - new_tokens[1], so every request fits one pool with its new tokens.
- `uniform`: uniform in `prompt_len`, each rate its own prompts (seeded by seed and rate), so
  that a prefix cache warmed at one rate does not make the next rate's prefills free. Needs
  `rate`; the first request is sent at 0 s. The HTTP serving benchmark's workload.

Arrivals: with `rate` (req/s), a Poisson process. For every kind but `uniform`, the gaps are
drawn once (exponential, mean 1) and divided by the rate, so every rate sees the same prompts in
the same order and the first request arrives after one gap. Without `rate`, every request
arrives at 0 s (offline).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass

# Ids below this are left out of seeded prompts: small ids are where tokenizers keep special tokens
# (SmolLM2: 0-16), and an eos id in a prompt would change what some engines do.
MIN_REGULAR_TOKEN_ID = 100
KINDS = ("offline", "short", "mixed", "long", "over", "fair", "uniform")
ONLINE_KINDS = ("short", "mixed", "long")  # the results suite's Poisson workloads


@dataclass(frozen=True, slots=True)
class Arrival:
    at_s: float  # seconds after the run starts
    prompt_ids: list[int]
    max_new: int


def seeded_prompts(
    vocab_size: int, n: int, min_len: int = 32, max_len: int = 40, seed: int = 0
) -> list[list[int]]:
    """`n` prompts of random token ids, lengths uniform in [min_len, max_len], same for a seed."""
    if vocab_size <= MIN_REGULAR_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {MIN_REGULAR_TOKEN_ID}, got {vocab_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_range("prompt length", (min_len, max_len))
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(n)]
    return [[rng.randrange(MIN_REGULAR_TOKEN_ID, vocab_size) for _ in range(k)] for k in lengths]


def make_workload(
    kind: str,
    num_requests: int,
    vocab_size: int,
    *,
    seed: int,
    new_tokens: tuple[int, int],
    rate: float | None = None,
    **shape,
) -> list[Arrival]:
    """`num_requests` seeded requests of workload `kind` (module docstring), in arrival order.

    `shape` holds the kind's own parameters: `prompt_len=(lo, hi)` for offline and uniform;
    `pool_tokens`, `num_long`, `long_frac=(lo, hi)` and `short_len=(lo, hi)` for over and fair
    (there `num_requests` counts long and short together). An unknown one raises TypeError.
    """
    if kind not in KINDS:
        raise ValueError(f"workload must be one of {KINDS}, got {kind!r}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    _check_range("new_tokens", new_tokens)
    if kind == "uniform":
        return _uniform(num_requests, vocab_size, seed, new_tokens, rate, **shape)
    if kind == "offline":
        return _offline(num_requests, vocab_size, seed, new_tokens, rate, **shape)
    rng = random.Random(f"{seed}-{kind}")
    if kind in ("over", "fair"):
        lens = _pool_lens(kind, num_requests, rng, max_new=new_tokens[1], **shape)
    else:
        if shape:
            raise TypeError(f"workload {kind!r} takes no shape parameters, got {sorted(shape)}")
        lens = prompt_lens(kind, num_requests, rng)
    prompts = [seeded_prompts(vocab_size, 1, k, k, seed=rng.randrange(2**31))[0] for k in lens]
    news = [rng.randint(*new_tokens) for _ in prompts]
    return _arrive(prompts, news, rng, rate)


def prompt_lens(kind: str, n: int, rng: random.Random) -> list[int]:
    """Prompt lengths of the online workload `kind` (short, mixed, long)."""
    if kind == "short":
        return [rng.randint(100, 400) for _ in range(n)]
    if kind == "mixed":
        num_long = min(n, max(2, n // 6))
        lens = [rng.randint(600, 2400) for _ in range(num_long)]
        lens += [rng.randint(100, 400) for _ in range(n - num_long)]
        rng.shuffle(lens)
        return lens
    if kind == "long":
        return [int(math.exp(rng.uniform(math.log(30), math.log(3000)))) for _ in range(n)]
    raise ValueError(f"workload must be one of {ONLINE_KINDS}, got {kind!r}")


def _pool_lens(kind: str, n: int, rng: random.Random, *, max_new: int, pool_tokens: int,
               num_long: int, long_frac: tuple[float, float],
               short_len: tuple[int, int]) -> list[int]:
    """Long prompts sized against one pool, shuffled among short ones (over / fair)."""
    if not 0 <= num_long <= n:
        raise ValueError(f"need 0 <= num_long <= num_requests, got {num_long} and {n}")
    lo, hi = long_frac
    long_lens = []
    for _ in range(num_long):
        k = rng.randint(int(lo * pool_tokens), int(hi * pool_tokens))
        long_lens.append(k if kind == "over" else min(k, pool_tokens - max_new))
    lens = long_lens + [rng.randint(*short_len) for _ in range(n - num_long)]
    rng.shuffle(lens)
    return lens


def _offline(n: int, vocab_size: int, seed: int, new_tokens: tuple[int, int],
             rate: float | None, prompt_len: tuple[int, int] = (32, 40)) -> list[Arrival]:
    rng = random.Random(seed)  # the draws of seeded_prompts, continued for max_new and gaps
    _check_range("prompt_len", prompt_len)
    lengths = [rng.randint(*prompt_len) for _ in range(n)]
    prompts = [[rng.randrange(MIN_REGULAR_TOKEN_ID, vocab_size) for _ in range(k)]
               for k in lengths]
    news = [rng.randint(*new_tokens) for _ in prompts]
    return _arrive(prompts, news, rng, rate)


def _uniform(n: int, vocab_size: int, seed: int, new_tokens: tuple[int, int],
             rate: float | None, prompt_len: tuple[int, int]) -> list[Arrival]:
    if rate is None:
        raise ValueError("the uniform workload needs a rate (its prompts are seeded by it)")
    _check_range("prompt_len", prompt_len)
    rng = random.Random(f"serving-{seed}-{rate}")
    at, arrivals = 0.0, []
    for _ in range(n):
        k = rng.randint(*prompt_len)
        prompt = [rng.randrange(MIN_REGULAR_TOKEN_ID, vocab_size) for _ in range(k)]
        arrivals.append(Arrival(at, prompt, rng.randint(*new_tokens)))
        at += rng.expovariate(rate)
    return arrivals


def _arrive(prompts: list[list[int]], news: list[int], rng: random.Random,
            rate: float | None) -> list[Arrival]:
    """Poisson arrivals at `rate` (gaps of mean 1 scaled by 1 / rate), or all at 0 s."""
    at, arrivals = 0.0, []
    for prompt, new in zip(prompts, news, strict=True):
        if rate is not None:
            at += rng.expovariate(1.0)
        arrivals.append(Arrival(at / rate if rate is not None else 0.0, prompt, new))
    return arrivals


def parse_range(text: str) -> tuple[int, int]:
    """A length range from the command line: "LO-HI", or "N" for N-N."""
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise ValueError(f"a length range is LO-HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _check_range(name: str, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must satisfy 1 <= lo <= hi, got {bounds}")


def load_prompts(path: str) -> list[list[int]]:
    """Read a prompt file: a JSON list of token-id lists."""
    with open(path) as f:
        prompts = json.load(f)
    if not isinstance(prompts, list) or not all(
        isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts
    ):
        raise ValueError(f"{path}: expected a JSON list of non-empty lists of token ids")
    return prompts


def main() -> None:
    """Write the offline prompt set as a prompt file: python -m bench.lib.workloads ..."""
    ap = argparse.ArgumentParser(description="Write a seeded prompt file (JSON) to stdout.")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prompts = seeded_prompts(args.vocab_size, args.num_prompts, args.min_len, args.max_len,
                             args.seed)
    print(json.dumps(prompts, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
