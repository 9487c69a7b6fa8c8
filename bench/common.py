"""Shared helpers for the scripts in bench/.

Contract: standard library only at import time (torch is imported inside `machine_info`), because
these helpers also run inside .venv-vllm, where infinillm is not installed. Scripts in bench/ import
this file as `common` (Python puts the script's folder first on sys.path).

Run as a script it writes a seeded prompt file, the workload every engine is measured on:
    python bench/common.py --vocab-size 49152 --num-prompts 8 > /tmp/prompts.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys

# Ids below this are left out of seeded prompts: small ids are where tokenizers keep special tokens
# (SmolLM2: 0-16), and an eos id in a prompt would change what some engines do.
MIN_REGULAR_TOKEN_ID = 100


def machine_info() -> dict:
    """What the numbers were measured on: CPU model, cores, RAM, torch version and threads."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(_mem_total_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def seeded_prompts(
    vocab_size: int, n: int, min_len: int = 32, max_len: int = 40, seed: int = 0
) -> list[list[int]]:
    """`n` prompts of random token ids, lengths uniform in [min_len, max_len], same for a seed.

    Ids are drawn from [MIN_REGULAR_TOKEN_ID, vocab_size), avoiding special tokens.
    """
    if vocab_size <= MIN_REGULAR_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {MIN_REGULAR_TOKEN_ID}, got {vocab_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len} max_len={max_len}")
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(n)]
    return [[rng.randrange(MIN_REGULAR_TOKEN_ID, vocab_size) for _ in range(k)] for k in lengths]


def load_prompts(path: str) -> list[list[int]]:
    """Read a prompt file: a JSON list of token-id lists."""
    with open(path) as f:
        prompts = json.load(f)
    if not isinstance(prompts, list) or not all(
        isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts
    ):
        raise ValueError(f"{path}: expected a JSON list of non-empty lists of token ids")
    return prompts


def print_table(rows: list[dict], file=None) -> None:
    """Print rows as an aligned text table; columns are the keys in first-seen order."""
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_format_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    print("\n".join(lines), file=file or sys.stdout, flush=True)


def _format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def emit_json(obj) -> None:
    """Print `obj` as one compact JSON line: the machine-readable last line of a benchmark."""
    print(json.dumps(obj, separators=(",", ":")), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a seeded prompt file (JSON) to stdout.")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    emit_json(
        seeded_prompts(args.vocab_size, args.num_prompts, args.min_len, args.max_len, args.seed)
    )


if __name__ == "__main__":
    main()
