"""What remote attention costs: decode step time of one long request with a share of its KV
blocks on another instance.

    python -m bench.remote_overhead [--context 2048] [--fractions 0,0.5,0.9]
                                    [--rounds 8] [--steps 15] [--placement suffix]

Configurations, each its own engine holding the same seeded prompt of `--context` tokens:
- `local`: one instance, lending off: every block local, no cluster machinery;
- `f` for each fraction: two instances, lending on; the request is prefilled on instance 0
  (a pool big enough for all of it) and then `engine.migrate_block` moves the fraction `f` of
  its logical blocks to instance 1. `f = 0` measures the cost of the cluster step alone.

Placement (`--placement`): `suffix` (default) puts the newest blocks remote, as reactive
borrowing leaves them, so every step also writes its new K/V remotely; `prefix` puts the oldest
remote and keeps the growing tail local. Recall is off for the run (`recall_headroom_fraction=1.0`:
an owner brings blocks home only while more than that share of its pool stays free, which never
happens), and the block table is checked to be unchanged after every timed segment.

Timing: `--rounds` rounds; in each, every configuration first steps untimed past the start of a
block (the step that opens a block runs with every block at home, so the new block is local),
then the fraction is placed again on the current length and `--steps` (< block_size) decode
steps are timed one by one (`engine.step()`, one request, greedy, ignore_eos): no timed step
opens a block, so the placement is exactly on target while timed. The order of the
configurations alternates forward and backward between rounds (ABC CBA ...) so that drift of the
machine cancels, and every request has the same context length in each round. Reports the
median (p50) ms per step with p10 and p90 (nearest rank, bench.lib.metrics), its ratio to
`local`, the paired ratio (median over rounds of the segment's median over the `local` segment's
median in the same round: robust to load that comes and goes), remote micro-attention calls, K/V
writes and bytes per step, and whether the greedy tokens of every configuration equal those of
`local` (exactness). Target: at most 1.25x at 50 %. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.lib.metrics import percentile
from bench.lib.ours import block_holders, greedy, model_info
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.workloads import seeded_prompts

WARMUP_STEPS = 4
REMOTE = 1  # the instance that holds the remote blocks; the request runs on instance 0


class Setup:
    """One engine, its single request, and what was measured on it."""

    def __init__(self, name: str, llm, fraction: float | None) -> None:
        self.name, self.llm, self.engine, self.fraction = name, llm, llm.engine, fraction
        self.rid = None
        self.prompt_len = 0
        self.step_ms: list[float] = []
        self.segment_medians: list[float] = []
        self.remote_fractions: list[float] = []
        self.calls = self.bytes = self.writes = self.steps = 0
        self.last = None

    def step(self) -> None:
        for out in self.engine.step():
            if out.request_id == self.rid:
                self.last = out

    def holders(self) -> list[int]:
        return block_holders(self.engine, self.rid)

    def place(self, placement: str) -> None:
        """Put `fraction` of the request's logical blocks on instance 1, the rest on 0."""
        if self.fraction is not None:
            self._move(chosen_blocks(len(self.holders()), self.fraction, placement))

    def home(self) -> None:
        """Bring every block to instance 0."""
        if self.fraction is not None:
            self._move(set())

    def _move(self, remote: set[int]) -> None:
        for index, holder in enumerate(self.holders()):
            dst = REMOTE if index in remote else 0
            if holder != dst and not self.engine.migrate_block(self.rid, index, dst):
                raise RuntimeError(f"{self.name}: could not move block {index} to {dst}")
        self.engine.check_integrity()

    def traffic(self) -> tuple[int, int, int]:
        """Cumulative remote micro-attention calls, bytes and K/V writes (cluster_stats)."""
        s = self.llm.cluster_stats()
        return s["remote_attention_calls"], s["remote_bytes"], s["remote_kv_writes"]

    def advance_past_block_start(self) -> None:
        """Untimed steps until the next one writes the second slot of a block, so that the
        next block_size - 1 steps open no block. The step that opens a block runs with every
        block at home: the new block is local, and the next placement is exactly on target."""
        block_size = self.engine.config.cache.block_size
        while self.num_computed_tokens() % block_size != 1:
            if self.num_computed_tokens() % block_size == 0:
                self.home()
            self.step()

    def num_computed_tokens(self) -> int:
        """Positions with K/V stored; the next decode step writes this position."""
        return self.prompt_len + len(self.last.outputs[0].token_ids) - 1

    def timed_segment(self, steps: int) -> None:
        before = self.holders() if self.fraction is not None else None
        calls, nbytes, writes = self.traffic()
        if before is not None:
            self.remote_fractions.append(sum(h == REMOTE for h in before) / len(before))
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step()
            self.step_ms.append((time.perf_counter() - t0) * 1e3)
        self.segment_medians.append(percentile(self.step_ms[-steps:], 50))
        calls_after, nbytes_after, writes_after = self.traffic()
        self.calls += calls_after - calls
        self.bytes += nbytes_after - nbytes
        self.writes += writes_after - writes
        self.steps += steps
        if before is not None and self.holders()[:len(before)] != before:
            raise RuntimeError(f"{self.name}: blocks moved during timing (recall not off?)")


def chosen_blocks(num_blocks: int, fraction: float, placement: str) -> set[int]:
    """Logical block indices to hold remotely: `round(fraction * num_blocks)` of them.

    `suffix`: the newest blocks, as reactive borrowing leaves them (each step also writes its
    K/V remotely); `prefix`: the oldest (writes stay local). Either way each side holds one run
    of adjacent blocks."""
    k = round(fraction * num_blocks)
    return set(range(k)) if placement == "prefix" else set(range(num_blocks - k, num_blocks))


def build(args, prompt: list[int], max_tokens: int) -> list[Setup]:
    from infinillm import LLM

    common_kw = dict(block_size=args.block_size, kv_blocks_per_instance=args.blocks,
                     max_num_batched_tokens=args.max_num_batched_tokens)
    configs = [Setup("local", LLM(args.model, num_instances=1, lending=False, **common_kw),
                     None)]
    for f in args.fractions:
        # Recall off: an owner brings blocks home only while more than this share of its pool
        # stays free, and more than the whole pool never does. (Swaps need debts both ways;
        # instance 1 owns nothing.)
        llm = LLM(args.model, num_instances=2, lending=True, max_lent_fraction=1.0,
                  recall_headroom_fraction=1.0, **common_kw)
        configs.append(Setup(f"{round(f * 100)}% remote", llm, f))
    for c in configs:
        c.rid = c.engine.add_request(prompt, greedy(max_tokens))
        c.prompt_len = len(prompt)
        while c.last is None or not c.last.outputs[0].token_ids:  # prefill
            c.step()
        if c.fraction is not None and set(c.holders()) != {0}:
            raise RuntimeError(f"{c.name}: prefill did not stay on instance 0")
        for _ in range(WARMUP_STEPS):
            c.step()
    return configs


def results(args, configs: list[Setup], per_block: int) -> list[dict]:
    local = configs[0]
    base = percentile(local.step_ms, 50)
    ref_tokens = list(local.last.outputs[0].token_ids)
    num_blocks = -(-(args.context + len(ref_tokens)) // args.block_size)
    out = []
    for c in configs:
        med = percentile(c.step_ms, 50)
        frac = statistics.mean(c.remote_fractions) if c.remote_fractions else 0.0
        # paired: this round's segment against the local segment of the same round
        paired = percentile([a / b for a, b in zip(c.segment_medians, local.segment_medians,
                                                   strict=True)], 50)
        out.append({"config": c.name, "target_fraction": c.fraction, "remote_fraction": frac,
                    "median_ms": med, "p10_ms": percentile(c.step_ms, 10),
                    "p90_ms": percentile(c.step_ms, 90), "ratio": med / base,
                    "paired_ratio": paired, "steps": c.steps,
                    "remote_calls_per_step": c.calls / c.steps,
                    "remote_kv_writes_per_step": c.writes / c.steps,
                    "remote_bytes_per_step": c.bytes / c.steps,
                    "same_tokens_as_local": list(c.last.outputs[0].token_ids) == ref_tokens,
                    "remote_kv_bytes": round(frac * num_blocks) * per_block})
    return out


def table_row(res: dict) -> dict:
    return {"config": res["config"], "remote blk %": round(100 * res["remote_fraction"], 1),
            "median ms": round(res["median_ms"], 2), "p10": round(res["p10_ms"], 2),
            "p90": round(res["p90_ms"], 2), "ratio": round(res["ratio"], 3),
            "paired ratio": round(res["paired_ratio"], 3),
            "remote calls/step": round(res["remote_calls_per_step"], 1),
            "remote KB/step": round(res["remote_bytes_per_step"] / 1e3, 1),
            "KV held remote MB": round(res["remote_kv_bytes"] / 1e6, 1),
            "same tokens": res["same_tokens_as_local"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--fractions", default="0,0.5,0.9", help="remote shares of the blocks")
    ap.add_argument("--placement", choices=["suffix", "prefix"], default="suffix")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15,
                    help="timed decode steps per segment, at most block_size - 1")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.fractions = [float(f) for f in args.fractions.split(",")]
    if any(not 0.0 <= f < 1.0 for f in args.fractions):
        ap.error(f"fractions must be in [0, 1), got {args.fractions}")
    if not 1 <= args.steps < args.block_size:
        ap.error(f"--steps must be in [1, block_size), got {args.steps}")
    max_tokens = WARMUP_STEPS + args.rounds * 2 * args.block_size + 2
    total = args.context + max_tokens
    args.blocks = -(-total // args.block_size) + 1  # the whole request fits on instance 0


    from infinillm.kvcache import block_bytes

    model_path, arch = model_info(args.model)
    prompt = seeded_prompts(arch.vocab_size, 1, args.context, args.context, seed=args.seed)[0]
    configs = build(args, prompt, max_tokens)
    for r in range(args.rounds):
        for c in configs if r % 2 == 0 else configs[::-1]:
            c.advance_past_block_start()
            c.place(args.placement)
            c.timed_segment(args.steps)
    per_block = block_bytes(arch.num_layers, arch.num_kv_heads, arch.head_dim, args.block_size,
                            configs[0].engine.executor.workers[0].model.dtype)
    res = results(args, configs, per_block)
    print_table([table_row(r) for r in res])
    emit_json({"bench": "remote_overhead", "machine": machine_info(), "model": str(model_path),
               "context": args.context,
               "final_context": args.context + len(configs[0].last.outputs[0].token_ids),
               "block_size": args.block_size, "placement": args.placement,
               "rounds": args.rounds, "steps_per_segment": args.steps, "seed": args.seed,
               "block_bytes": per_block, "results": res})


if __name__ == "__main__":
    main()
