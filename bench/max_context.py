"""How long a context fits: the longest prompt served by 1 instance vs N instances with the same
per-instance KV pool.

    python -m bench.max_context [--instances 1,2,4] [--blocks-per-instance 48] [--block-size 16]
                                [--max-lent-fraction 0.9] [--seed 0] [--no-reference]

For each cluster size N (lending on; one instance has nothing to borrow from):
1. the longest prompt the engine admits, found by bisection on `engine.prepare` (the admission
   check, which raises ValueError for a prompt that cannot be served), and a check that one
   token more is refused;
2. a seeded prompt of exactly that length is served to completion (2 new tokens, greedy,
   ignore_eos) by stepping the engine by hand, recording after every step the blocks the owner
   has borrowed and on how many instances they live, and checking the ledger's integrity;
3. (unless --no-reference) the same prompt on one instance whose pool holds it all: the greedy
   tokens must be the same (DESIGN.md invariant 1, exactness), and its serve time is printed
   beside the cluster's ("1 big inst s"): what spreading the KV costs. Times are of one run
   each (the first is the process's first prefill); the block counts do not depend on timing.

The target is ratio / N >= 0.9: N instances together serve a context at least 0.9 N times as
long as one. By construction the admitted length is pool + (N - 1) * lendable blocks, so with
`--max-lent-fraction 0.9` the ratio / N tends to 0.9 from above as N grows. Prints a table and,
last, one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import time

from bench.lib.ours import greedy, longest_admitted, model_info, refusal, serve_one
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.workloads import seeded_prompts

NEW_TOKENS = 2


def measure(args, n_inst: int, base_prompt: list[int]) -> dict:
    from infinillm import LLM

    llm = LLM(args.model, block_size=args.block_size, kv_blocks_per_instance=args.blocks,
              num_instances=n_inst, lending=True, max_lent_fraction=args.max_lent_fraction,
              max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.engine
    length = longest_admitted(engine)
    limit = "model context" if length == engine.max_model_len - 1 else "kv blocks"
    refused = refusal(engine, length + 1)
    prompt = base_prompt[:length]
    result = serve_one(llm, prompt, NEW_TOKENS)
    stats = result.pop("stats")
    del llm
    gc.collect()
    return {"instances": n_inst, "max_prompt_tokens": length, "limited_by": limit,
            "max_blocks_per_request": engine.max_blocks_per_request,
            "plus_one_refused": refused is not None, "refusal": refused,
            "prompt": prompt, **result,
            "remote_attention_calls": stats["remote_attention_calls"],
            "remote_bytes": stats["remote_bytes"], "preemptions": stats["preemptions"],
            "standstills": stats["standstills"]}


def reference_runs(args, prompts: list[list[int]]) -> list[tuple[list[int], float]]:
    """Greedy tokens of each prompt, and the seconds to serve it, on ONE instance whose pool
    holds the longest prompt."""
    from infinillm import LLM

    longest = max(len(p) for p in prompts) + NEW_TOKENS
    llm = LLM(args.model, block_size=args.block_size,
              kv_blocks_per_instance=-(-longest // args.block_size) + 1, num_instances=1,
              max_num_batched_tokens=args.max_num_batched_tokens)
    runs = []
    for p in prompts:
        t0 = time.perf_counter()
        out = llm.generate([p], greedy(NEW_TOKENS), use_tqdm=False)[0]
        runs.append((list(out.outputs[0].token_ids), time.perf_counter() - t0))
    return runs


def table_row(r: dict, pool_tokens: int) -> dict:
    row = {"instances": r["instances"], "pool tok/inst": pool_tokens,
           "max prompt tok": r["max_prompt_tokens"], "limited by": r["limited_by"],
           "ratio": round(r["ratio_to_first"], 3), "ratio/N": round(r["ratio_per_instance"], 3),
           "len+1 refused": r["plus_one_refused"], "served": r["completed"],
           "max borrowed blk": r["max_borrowed_blocks"], "holders": r["max_holders"],
           "remote MB": round(r["remote_bytes"] / 1e6, 1), "serve s": round(r["seconds"], 1)}
    if "same_tokens_as_one_big_instance" in r:
        row["1 big inst s"] = round(r["one_big_instance_seconds"], 1)
        row["same tokens"] = r["same_tokens_as_one_big_instance"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--instances", default="1,2,4", help="cluster sizes; the first is the base")
    ap.add_argument("--blocks-per-instance", dest="blocks", type=int, default=48)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-lent-fraction", type=float, default=0.9)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the exactness check against one big instance")
    args = ap.parse_args()
    sizes = [int(n) for n in args.instances.split(",")]
    # One seeded prompt as long as any cluster could admit; each N serves its prefix.
    model_path, arch = model_info(args.model)
    base = seeded_prompts(arch.vocab_size, 1, arch.max_model_len, arch.max_model_len,
                          seed=args.seed)[0]
    results = [measure(args, n, base) for n in sizes]
    if not args.no_reference:
        ref = reference_runs(args, [r["prompt"] for r in results])
        for r, (tokens, seconds) in zip(results, ref, strict=True):
            r["same_tokens_as_one_big_instance"] = r["token_ids"] == tokens
            r["reference_token_ids"] = tokens
            r["one_big_instance_seconds"] = seconds
    base_len = results[0]["max_prompt_tokens"]
    rows = []
    for r in results:
        r["ratio_to_first"] = r["max_prompt_tokens"] / base_len
        r["ratio_per_instance"] = r["ratio_to_first"] / r["instances"] * sizes[0]
        rows.append(table_row(r, args.blocks * args.block_size))
        del r["prompt"]
    print_table(rows)
    emit_json({"bench": "max_context", "machine": machine_info(), "model": str(model_path),
               "block_size": args.block_size, "blocks_per_instance": args.blocks,
               "max_lent_fraction": args.max_lent_fraction, "seed": args.seed,
               "new_tokens": NEW_TOKENS, "results": results})


if __name__ == "__main__":
    main()
