"""What the Ray executor costs: decode step time inproc vs Ray (2 processes), and where it goes.

    python -m bench.ray_overhead [--context 1024] [--steps 30] [--model DIR]

Same workload on both executors: 2 instances, 1 CPU thread per instance; request A (context
`--context`) on instance 0 with half of its blocks moved to instance 1 (so every layer does a
remote micro-attention), request B (a quarter of that) on instance 1. Recall is off
(`recall_headroom_fraction=1.0`) so the placement holds. Per decode step: wall time at the
driver; compute (worker execute minus exchange); exchange (the per-layer remote traffic, holder
work included); control (the driver's scheduling and bookkeeping plus, for Ray, the actor round
trip: wall minus execute). With Ray the two instances compute in parallel, in two processes;
inproc runs them one after the other. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import time

from bench.lib.ours import block_holders, greedy, model_info
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.workloads import seeded_prompts

WARMUP_STEPS = 3


def prefill(engine, prompts: list[list[int]]) -> list[str]:
    """Add the requests and step until each has its first token; their ids."""
    ids = [engine.add_request(p, greedy(10**6)) for p in prompts]
    started: set[str] = set()
    while len(started) < len(ids):
        started |= {o.request_id for o in engine.step() if o.outputs[0].token_ids}
    return ids


def split(executor: str, stats_before, stats_after, steps: int, wall: float,
          layers: int) -> dict:
    """Per-step milliseconds from two fabric_stats snapshots around `steps` steps."""
    execute = (stats_after.execute_seconds - stats_before.execute_seconds) / steps
    exchange = (stats_after.exchange_seconds - stats_before.exchange_seconds) / steps
    transfer = (stats_after.transfer_seconds - stats_before.transfer_seconds) / steps
    if executor == "ray":  # two actors in parallel: per-actor time is half the sum
        execute, exchange, transfer = execute / 2, exchange / 2, transfer / 2
    return {"executor": executor, "ms/step": round(wall * 1e3, 2),
            "compute ms": round((execute - exchange) * 1e3, 2),
            "exchange ms": round(exchange * 1e3, 2),
            "exchange us/layer": round(exchange / layers * 1e6, 1),
            "of which waiting us/layer": round(transfer / layers * 1e6, 1),
            "control ms": round((wall - execute) * 1e3, 2),
            "remote KB/step": round((stats_after.bytes_sent - stats_before.bytes_sent)
                                    / steps / 1e3, 1)}


def measure(executor: str, args, prompts) -> dict:
    from infinillm import LLM

    llm = LLM(args.model, executor=executor, num_instances=2, block_size=16,
              kv_blocks_per_instance=args.context // 8, num_threads=1, cpus_per_instance=1,
              recall_headroom_fraction=1.0)  # recall off: keep the placement under test
    try:
        engine = llm.engine
        a = prefill(engine, prompts)[0]
        num_blocks = len(block_holders(engine, a))
        moved = sum(engine.migrate_block(a, i, 1) for i in range(0, num_blocks, 2))
        for _ in range(WARMUP_STEPS):  # with the final placement
            engine.step()
        # executor counters, fresh (the Ray executor otherwise reuses them for 0.2 s)
        before = engine.executor.fabric_stats(max_age_s=0.0)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = (time.perf_counter() - t0) / args.steps
        after = engine.executor.fabric_stats(max_age_s=0.0)
        row = split(executor, before, after, args.steps, wall, engine.arch.num_layers)
        return {**row, "blocks moved": moved}
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    _, arch = model_info(args.model)
    long = seeded_prompts(arch.vocab_size, 1, args.context, args.context, seed=1)[0]
    short = seeded_prompts(arch.vocab_size, 1, args.context // 4, args.context // 4, seed=2)[0]
    rows = [measure(e, args, [long, short]) for e in ("inproc", "ray")]
    print_table(rows)
    emit_json({"bench": "ray_overhead", "machine": machine_info(), "context": args.context,
               "steps": args.steps, "rows": rows,
               "ray_over_inproc": round(rows[1]["ms/step"] / rows[0]["ms/step"], 2)})


if __name__ == "__main__":
    main()
