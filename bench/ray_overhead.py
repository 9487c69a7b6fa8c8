"""Decode step time inproc vs Ray (2 processes), and where the time goes.

    .venv/bin/python bench/ray_overhead.py [--context 1024] [--steps 30] [--model DIR]

Same workload on both executors: 2 instances, 1 CPU thread per instance; request A (context
`--context`) on instance 0 with half of its blocks moved to instance 1 (so every layer does a
remote micro-attention), request B (a quarter of that) on instance 1. Recall is disabled so the
placement holds. Per decode step: wall time at the driver; compute (worker execute minus
exchange); exchange (the per-layer remote traffic, holder work included); control (the driver's
scheduling and bookkeeping plus, for Ray, the actor round trip: wall minus execute). With Ray the
two instances compute in parallel, in two processes; inproc runs them one after the other.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine_info, print_table, seeded_prompts  # noqa: E402


def measure(executor: str, args, prompts) -> dict:
    from infinillm import LLM, SamplingParams

    llm = LLM(args.model, executor=executor, num_instances=2, block_size=16,
              kv_blocks_per_instance=args.context // 8, num_threads=1, cpus_per_instance=1)
    try:
        engine = llm.engine
        engine.gmanager.recall_headroom = 10**9  # keep the placement under test
        params = SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts]
        a = ids[0]
        while not all(engine.streams[i].request.output_token_ids for i in ids):  # prefill
            engine.step()
        table = engine.instance(0).rmanager.tables[a]
        moved = sum(engine.migrate_block(a, i, 1) for i in range(0, len(table), 2))
        fresh = {"max_age_s": 0.0}
        for _ in range(3):  # warm-up with the final placement
            engine.step()
        before = engine.executor.fabric_stats(**fresh)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = (time.perf_counter() - t0) / args.steps
        after = engine.executor.fabric_stats(**fresh)
        layers = engine.arch.num_layers
        execute = (after.execute_seconds - before.execute_seconds) / args.steps
        exchange = (after.exchange_seconds - before.exchange_seconds) / args.steps
        transfer = (after.transfer_seconds - before.transfer_seconds) / args.steps
        if executor == "ray":  # two actors in parallel: per-actor time is half the sum
            execute, exchange, transfer = execute / 2, exchange / 2, transfer / 2
        return {
            "executor": executor,
            "ms/step": round(wall * 1e3, 2),
            "compute ms": round((execute - exchange) * 1e3, 2),
            "exchange ms": round(exchange * 1e3, 2),
            "exchange us/layer": round(exchange / layers * 1e6, 1),
            "of which waiting us/layer": round(transfer / layers * 1e6, 1),
            "control ms": round((wall - execute) * 1e3, 2),
            "remote KB/step": round((after.bytes_sent - before.bytes_sent) / args.steps / 1e3, 1),
            "blocks moved": moved,
        }
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    long = seeded_prompts(49152, 1, args.context, args.context, seed=1)[0]
    short = seeded_prompts(49152, 1, args.context // 4, args.context // 4, seed=2)[0]
    rows = [measure(e, args, [long, short]) for e in ("inproc", "ray")]
    print_table(rows)
    emit_json({"bench": "ray_overhead", "machine": machine_info(), "context": args.context,
               "steps": args.steps, "rows": rows,
               "ray_over_inproc": round(rows[1]["ms/step"] / rows[0]["ms/step"], 2)})


if __name__ == "__main__":
    main()
