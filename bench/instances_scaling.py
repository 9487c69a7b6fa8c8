"""Offline throughput of 1, 2 and 4 in-process instances with the same total KV memory.

    python -m bench.instances_scaling [--model DIR] [--instances 1,2,4] [--batch 32]
        [--max-tokens 32] [--total-blocks 512] [--repeats 2] [--threads N]

Every configuration gets the same seeded requests (the `offline` workload: `--batch` prompts of
32-40 random token ids, greedy, ignore_eos, `--max-tokens` new tokens each) and splits
`--total-blocks` KV blocks evenly over its instances. With more than one instance it runs twice,
in turn within each repeat: `joint` (the default: one forward of the shared model per step
for all instances, runtime/worker.py `forward_together`) and `separate` (each instance its own
forward, one after another, as before the joint forward; `InProcExecutor.joint_forward = False`).
All engines are built (and warmed up with one generate) first; each repeat then runs every
configuration once, in turn, so that a change of the machine's load hits them alike (best of
`--repeats` kept). The ratio
is tokens/s over one instance's, measured in the same run; `same tokens` compares every greedy
token with one instance's. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.lib.ours import greedy, model_info
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.workloads import make_workload


def timed_generate(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    started = time.perf_counter()
    outs = llm.generate(prompts, greedy(max_tokens), use_tqdm=False)
    return time.perf_counter() - started, [o.outputs[0].token_ids for o in outs]


def build(model: str | None, num_instances: int, total_blocks: int, prompts: list[list[int]],
          max_tokens: int, num_threads: int | None):
    """An engine of `num_instances` instances splitting `total_blocks`, warmed up once."""
    from infinillm import LLM

    llm = LLM(model, num_instances=num_instances,
              kv_blocks_per_instance=total_blocks // num_instances, num_threads=num_threads)
    llm.generate(prompts, greedy(max_tokens), use_tqdm=False)
    return llm


def run_all(engines: dict, prompts: list[list[int]], max_tokens: int,
            repeats: int) -> dict[tuple[int, str], dict]:
    """Per (instances, mode): best seconds, tokens/s and greedy tokens. Every repeat runs every
    configuration once, in turn, so that a change in the machine's load hits them alike."""
    configs = [(n, mode) for n in engines
               for mode in (["joint", "separate"] if n > 1 else ["joint"])]
    best: dict[tuple[int, str], float] = {}
    tokens: dict[tuple[int, str], list] = {}
    for _ in range(repeats):
        for n, mode in configs:
            engines[n].engine.executor.joint_forward = mode == "joint"
            seconds, tokens[n, mode] = timed_generate(engines[n], prompts, max_tokens)
            best[n, mode] = min(best.get((n, mode), seconds), seconds)
            print(f"{n} instance(s), {mode}: {seconds:.2f} s", file=sys.stderr)
    new_tokens = len(prompts) * max_tokens
    return {c: {"seconds": best[c], "tokens_per_s": new_tokens / best[c],
                "ms_per_step": best[c] / max_tokens * 1e3, "token_ids": tokens[c]}
            for c in configs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--instances", default="1,2,4")
    ap.add_argument("--batch", type=int, default=32, help="requests, all sent at once")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--total-blocks", type=int, default=512, help="KV blocks of all instances")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per mode; best is kept")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 where other work shares the cores")
    args = ap.parse_args()
    counts = [int(n) for n in args.instances.split(",")]
    if counts[0] != 1:
        ap.error(f"--instances must start with 1 (the baseline), got {args.instances}")
    model_path, arch = model_info(args.model)
    requests = make_workload("offline", args.batch, arch.vocab_size, seed=0,
                             new_tokens=(args.max_tokens, args.max_tokens))
    prompts = [a.prompt_ids for a in requests]
    engines = {n: build(args.model, n, args.total_blocks, prompts, args.max_tokens,
                        args.threads) for n in counts}
    runs = run_all(engines, prompts, args.max_tokens, args.repeats)
    base = runs[1, "joint"]
    rows = []
    for (n, mode), r in runs.items():
        same = sum(a == b for a, b in zip(r["token_ids"], base["token_ids"], strict=True))
        rows.append({"instances": n, "forward": mode if n > 1 else "-",
                     "blocks/instance": args.total_blocks // n,
                     "tok/s": round(r["tokens_per_s"], 1),
                     "ms/step": round(r["ms_per_step"], 1),
                     "ratio vs 1": round(r["tokens_per_s"] / base["tokens_per_s"], 3),
                     "same tokens": f"{same}/{len(prompts)}"})
    print_table(rows)
    emit_json({"bench": "instances_scaling", "machine": machine_info(),
               "model": str(model_path), "batch": args.batch, "max_tokens": args.max_tokens,
               "total_blocks": args.total_blocks, "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
