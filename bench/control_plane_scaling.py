"""How does the control plane's time per step grow with the size of the cluster?

    python -m bench.control_plane_scaling [--instances 2,4,8,16,32] [--blocks 4000]
                                          [--requests-per-instance 30] [--max-steps 400]
                                          [--executor auto|sim|none]

For each cluster size, one engine on a virtual clock with an executor that runs no model (the
simulator's `SimExecutor` where infinillm.sim exists, else `NoModelExecutor` here: the
executor's time is not counted, and which one ran changes no decision, since requests are greedy
with ignore_eos and end by their max_tokens). The cluster is `--blocks` blocks per instance, so the
blocks grow with it, and so does the request mix: `--requests-per-instance` requests per
instance, seeded, one in four long (prompts uniform in [4000, 20000] tokens, longer than a
quarter of a pool: they borrow) among short ones ([100, 2000]), each asking for [50, 500] new
tokens; they arrive by step number, half an instance's worth per step (new requests every step,
queues building up: routing, admission, borrowing, recall and reclaims all run).

Timed per step, on the wall clock: the admissions of the step's new requests, `engine.step()`
(rebalance, schedule, run, update) and `cluster_stats()` (what a server or a benchmark reads each
step), minus the executor's `execute` and `move_blocks`: the control plane's seconds. Steps run
until every request finished or `--max-steps`. A small warm-up engine runs first. Reports per
size the median (p50, nearest rank) and p90 ms per step, the mean, the mean per instance and per
scheduled chunk (flat where the cost follows the work, not the blocks), and checks the pools and
ledger with `check_integrity()` after the run. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from bench.lib.metrics import percentile
from bench.lib.report import emit_json, machine_info, print_table

# A Llama shape: only its config.json is read (no weights run); the context fits any prompt.
TINY_ARCH = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}
SHORT_LEN, LONG_LEN, NEW_TOKENS = (100, 2000), (4000, 20000), (50, 500)
TOKEN_IDS = (100, 30000)  # prompt token ids, clear of special ids


def model_folder(root: Path) -> Path:
    """A folder with only a config.json (TINY_ARCH)."""
    (root / "config.json").write_text(json.dumps(TINY_ARCH))
    return root


def executor_class(name: str):
    """`sim`: the simulator's SimExecutor; `none`: `NoModelExecutor`; `auto`: the simulator's
    where infinillm.sim exists, else `NoModelExecutor`."""
    if name == "none":
        return no_model_executor()
    try:
        from infinillm.sim import SimExecutor
    except ImportError:
        if name == "sim":
            raise
        return no_model_executor()
    return SimExecutor


def no_model_executor():
    """A minimal executor that runs no model: every sampling request gets one token, and a
    step costs nothing (the control plane is what is measured). Used where the simulator's
    SimExecutor is not available."""
    from infinillm.runtime.executor import Executor, StepResult
    from infinillm.runtime.fabric import FabricStats

    class NoModelExecutor(Executor):
        def __init__(self, config, spec, instance_ids) -> None:
            self.token_id = spec.arch.vocab_size - 1

        def execute(self, plans):
            sampled = {c.request_id: self.token_id for p in plans for c in p.chunks if c.sample}
            return StepResult(sampled, {p.instance_id: 0.0 for p in plans if p.chunks})

        def move_blocks(self, moves) -> float:
            return 0.0

        def fabric_stats(self, max_age_s: float = 0.2):
            return FabricStats()

    return NoModelExecutor


def timed(factory, spent: list[float]):
    """`factory`'s executor, with the seconds of its execute and move_blocks added to
    `spent[0]` (what is taken out of the step's time)."""

    def make(config, spec, instance_ids):
        executor = factory(config, spec, instance_ids)
        for name in ("execute", "move_blocks"):
            inner = getattr(executor, name)

            def wrapper(*args, _inner=inner):
                started = time.perf_counter()
                try:
                    return _inner(*args)
                finally:
                    spent[0] += time.perf_counter() - started

            setattr(executor, name, wrapper)
        return executor

    return make


def workload(num_requests: int, num_instances: int, seed: int,
             short_len: tuple[int, int] = SHORT_LEN, long_len: tuple[int, int] = LONG_LEN,
             new_tokens: tuple[int, int] = NEW_TOKENS) -> list[tuple[int, list[int], int]]:
    """(arrival step, prompt token ids, max new tokens) per request, seeded: one in four long;
    half an instance's worth of requests arrive per step."""
    rng = random.Random(seed)
    out = []
    for i in range(num_requests):
        lo, hi = long_len if rng.random() < 0.25 else short_len
        prompt = [rng.randrange(*TOKEN_IDS)] * rng.randint(lo, hi)
        out.append((2 * i // num_instances, prompt, rng.randint(*new_tokens)))
    return out


def measure(num_instances: int, blocks: int, requests_per_instance: int, max_steps: int,
            model: Path, factory, block_size: int = 16, max_num_batched_tokens: int = 2048,
            max_num_seqs: int = 128, seed: int = 0, **lengths) -> dict:
    """Run one cluster size; its control-plane seconds per step and what the steps did.
    `lengths`: `workload`'s prompt and output lengths (default: the module's)."""
    from infinillm import SamplingParams
    from infinillm.config import Config
    from infinillm.engine import ClusterEngine, VirtualClock

    config = Config.from_kwargs(model=str(model), block_size=block_size,
                                num_instances=num_instances, kv_blocks_per_instance=blocks,
                                max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                # prompts of one repeated token would all hit the prefix cache
                                enable_prefix_caching=False)
    spent = [0.0]
    engine = ClusterEngine.from_config(config, VirtualClock(), timed(factory, spent))
    arrivals = workload(requests_per_instance * num_instances, num_instances, seed, **lengths)
    step_s: list[float] = []
    num_chunks = num_tokens = num_moves = added = 0
    while (added < len(arrivals) or engine.has_unfinished_requests()) and len(step_s) < max_steps:
        started, before = time.perf_counter(), spent[0]
        while added < len(arrivals) and arrivals[added][0] <= len(step_s):
            _, prompt, max_new = arrivals[added]
            engine.add_request(prompt, SamplingParams(max_tokens=max_new, temperature=0.0,
                                                      ignore_eos=True))
            added += 1
        engine.step()
        engine.cluster_stats()
        step_s.append(time.perf_counter() - started - (spent[0] - before))
        record = engine.last_step
        num_chunks += sum(i.num_seqs for i in record.instances)
        num_tokens += record.num_tokens
        num_moves += record.num_moves
    engine.check_integrity()
    steps = len(step_s)
    total = sum(step_s)
    return {
        "instances": num_instances,
        "cluster_blocks": num_instances * blocks,
        "requests": len(arrivals),
        "finished": added - len(engine.streams),
        "steps": steps,
        "chunks_per_step": num_chunks / max(steps, 1),
        "tokens_per_step": num_tokens / max(steps, 1),
        "moves": num_moves,
        "preemptions": engine.cluster_stats()["preemptions"],
        "ms_per_step_p50": 1e3 * (percentile(step_s, 50) or 0.0),
        "ms_per_step_p90": 1e3 * (percentile(step_s, 90) or 0.0),
        "ms_per_step_mean": 1e3 * total / max(steps, 1),
        "us_per_instance_step": 1e6 * total / max(steps * num_instances, 1),
        "us_per_chunk": 1e6 * total / max(num_chunks, 1),
        "control_plane_s": total,
        "executor_s": spent[0],
    }


def table_row(r: dict) -> dict:
    return {"instances": r["instances"], "blocks": r["cluster_blocks"],
            "requests": r["requests"], "steps": r["steps"],
            "chunks/step": round(r["chunks_per_step"], 1), "moves": r["moves"],
            "ms/step p50": r["ms_per_step_p50"], "p90": r["ms_per_step_p90"],
            "mean": r["ms_per_step_mean"], "us/inst-step": r["us_per_instance_step"],
            "us/chunk": r["us_per_chunk"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", default="2,4,8,16,32", help="cluster sizes")
    ap.add_argument("--blocks", type=int, default=4000, help="KV blocks per instance")
    ap.add_argument("--requests-per-instance", type=int, default=30)
    ap.add_argument("--max-steps", type=int, default=400, help="per cluster size")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--model", default=None,
                    help="a folder with a config.json (default: a small Llama shape)")
    ap.add_argument("--executor", choices=["auto", "sim", "none"], default="auto",
                    help="what runs the plans (its time is not counted; decisions are the same)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(n) for n in args.instances.split(",")]
    factory = executor_class(args.executor)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else model_folder(Path(tmp))
        common = dict(model=model, factory=factory, block_size=args.block_size,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      max_num_seqs=args.max_num_seqs, seed=args.seed)
        measure(2, 500, 4, 30, **common)  # warm-up: imports, first calls
        rows = [measure(n, args.blocks, args.requests_per_instance, args.max_steps, **common)
                for n in sizes]
    print(f"executor: {factory.__name__} (its time not counted); {args.blocks} blocks of "
          f"{args.block_size} tokens per instance, {args.requests_per_instance} requests per "
          f"instance, at most {args.max_steps} steps")
    print_table([table_row(r) for r in rows])
    emit_json({"bench": "control_plane_scaling", "machine": machine_info(),
               "executor": factory.__name__, "blocks_per_instance": args.blocks,
               "block_size": args.block_size, "requests_per_instance": args.requests_per_instance,
               "max_steps": args.max_steps, "max_num_batched_tokens": args.max_num_batched_tokens,
               "max_num_seqs": args.max_num_seqs, "seed": args.seed, "results": rows})


if __name__ == "__main__":
    main()
