"""What does the prefix cache buy for a shared system prompt? TTFT of a hit against a miss, and
how many blocks hold the shared prefix when many requests read it across instances.

    python -m bench.prefix_cache [--model PATH] [--system-len 2000] [--rounds 3]
        [--num-shared 8] [--kv-memory 512MiB]

1. TTFT, one instance, the default model unless --model: per round a fresh system prompt of
   --system-len seeded random tokens; the first request with it (a miss: the whole prompt is
   computed) and then another request with the same system prompt and another question (a hit:
   only the blocks past the cached ones are computed). Each request alone, greedy, one new
   token; TTFT = wall time from `add_request` to its first token, stepping the engine by hand.
   Medians over --rounds rounds, after a warm-up. The same requests with the cache off give
   the miss time a second way (no lookup, no publishing; skipped with --no-baseline).
2. Sharing across instances: two instances with lending, at most --num-shared / 2 requests in
   a batch (so the router, which prefers the instance that caches the prefix while it has room,
   puts half of them on the other instance). One request warms the cache, then --num-shared
   requests that share its system prompt (each its own question) are submitted at once, greedy,
   16 new tokens. Counted at every step: the distinct (instance, block) pairs that hold the
   system prompt's positions in the running requests' tables (their peak), the remote
   micro-attention calls, the blocks moved. The same run with the cache off is the baseline;
   greedy tokens of the two runs are compared (skipped with --no-baseline).

Prints a table, the ratios, and one JSON line last (with the machine).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bench.lib.ours import check_pools_whole, greedy
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.workloads import MIN_REGULAR_TOKEN_ID


def random_tokens(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(MIN_REGULAR_TOKEN_ID, vocab) for _ in range(n)]


def ttft(engine, prompt: list[int]) -> tuple[float, int]:
    """Seconds from submission to the first token of a request run alone; its cached tokens."""
    started = time.perf_counter()
    rid = engine.add_request(prompt, greedy(1))
    while True:
        for out in engine.step():
            if out.request_id == rid and out.outputs[0].token_ids:
                seconds = time.perf_counter() - started
                while engine.has_unfinished_requests():
                    engine.step()
                return seconds, out.num_cached_tokens


def measure_ttft(args, caching: bool) -> dict:
    from infinillm import LLM

    llm = LLM(args.model, kv_cache_memory_bytes=args.kv_memory, enable_prefix_caching=caching)
    engine = llm.engine
    vocab = engine.arch.vocab_size
    rng = random.Random(args.seed)
    ttft(engine, random_tokens(rng, vocab, 300))  # warm-up
    miss, hit, cached = [], [], []
    for _ in range(args.rounds):
        system = random_tokens(rng, vocab, args.system_len)
        seconds, _ = ttft(engine, system + random_tokens(rng, vocab, 24))
        miss.append(seconds)
        seconds, n = ttft(engine, system + random_tokens(rng, vocab, 24))
        hit.append(seconds)
        cached.append(n)
    check_pools_whole(llm)
    return {"caching": caching, "first_s": statistics.median(miss),
            "second_s": statistics.median(hit), "second_cached_tokens": min(cached)}


def prefix_holders(engine, rids: list[str], num_blocks: int) -> int:
    """Distinct (instance, block) pairs holding the first `num_blocks` blocks of the running
    requests' tables."""
    held = set()
    for rid in rids:
        where = engine.block_locations(rid)
        if where:
            held.update(where[:num_blocks])
    return len(held)


def measure_sharing(args, caching: bool) -> dict:
    from infinillm import LLM

    llm = LLM(args.model, kv_cache_memory_bytes=args.kv_memory, num_instances=2,
              max_num_seqs=max(1, args.num_shared // 2), enable_prefix_caching=caching)
    engine = llm.engine
    vocab = engine.arch.vocab_size
    rng = random.Random(args.seed + 1)
    system = random_tokens(rng, vocab, args.system_len)
    llm.generate([system + random_tokens(rng, vocab, 24)], greedy(1), use_tqdm=False)
    before = engine.cluster_stats()
    prompts = [system + random_tokens(rng, vocab, 24) for _ in range(args.num_shared)]
    rids = [engine.add_request(p, greedy(16)) for p in prompts]
    owners = {engine.streams[r].request.instance_id for r in rids}
    num_blocks = args.system_len // engine.config.cache.block_size
    peak, tokens, started = 0, {}, time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        peak = max(peak, prefix_holders(engine, rids, num_blocks))
    seconds = time.perf_counter() - started
    after = check_pools_whole(llm)
    return {"caching": caching, "instances_used": len(owners), "prefix_blocks": num_blocks,
            "peak_blocks_holding_prefix": peak,
            "remote_attention_calls": after["remote_attention_calls"]
            - before["remote_attention_calls"],
            "blocks_moved": after["migrations"] - before["migrations"],
            "cached_tokens": after["prefix_cache_hits"] - before["prefix_cache_hits"],
            "seconds": seconds, "tokens": [tokens[r] for r in rids]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--system-len", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-shared", type=int, default=8)
    parser.add_argument("--kv-memory", default="512MiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="ttft,sharing",
                        help="which measurements to run, comma-separated: ttft, sharing")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the runs with the cache off (the misses of the cache-on "
                             "runs stay the baseline of the TTFT ratio)")
    args = parser.parse_args()
    from infinillm.config import parse_size

    args.kv_memory = parse_size(args.kv_memory)
    parts = set(args.parts.split(","))
    report = {"benchmark": "prefix_cache", "machine": machine_info(),
              "system_len": args.system_len, "rounds": args.rounds}
    if "ttft" in parts:
        report["ttft"] = ttft_part(args)
    if "sharing" in parts:
        report["sharing"] = sharing_part(args)
    emit_json(report)


def ttft_part(args) -> dict:
    runs = [measure_ttft(args, True)] + ([] if args.no_baseline else [measure_ttft(args, False)])
    print_table([{"cache": "on" if r["caching"] else "off", "ttft first (miss) s": r["first_s"],
                  "ttft second s": r["second_s"], "cached tokens": r["second_cached_tokens"]}
                 for r in runs])
    on, off = runs[0], runs[-1] if len(runs) > 1 else None
    ratio = on["second_s"] / on["first_s"]
    print(f"TTFT of a hit / TTFT of a miss (cache on, same run): {ratio:.3f}")
    if off is not None:
        print(f"hit / miss with the cache off: {on['second_s'] / off['first_s']:.3f}")
    return {"on": on, "off": off, "hit_over_miss": ratio}


def sharing_part(args) -> dict:
    shared = [measure_sharing(args, True)] + ([] if args.no_baseline
                                              else [measure_sharing(args, False)])
    tokens = [r.pop("tokens") for r in shared]
    print_table(shared)
    same = tokens[0] == tokens[-1] if len(tokens) > 1 else None
    if same is not None:
        print(f"greedy tokens equal with and without the cache: {same}")
    return {"on": shared[0], "off": shared[1] if len(shared) > 1 else None,
            "tokens_equal": same}


if __name__ == "__main__":
    main()
