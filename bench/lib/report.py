"""What a benchmark ran on, and how it prints: a table for people, then one JSON line.

Contract: standard library only at import time (torch is imported inside `machine_info`), because
the vLLM side uses it inside .venv-vllm.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


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


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark processes running now: they would share the cores.

    A benchmark runs a file of bench/ or a `bench.` module; this process and its parent (make,
    a shell) are left out."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) in mine:
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(_names_benchmark(a) for a in args):
            found.append(" ".join(args).strip())
    return found


def _names_benchmark(arg: str) -> bool:
    return arg.startswith("bench.") or (arg.endswith(".py") and Path(arg).parent.name == "bench")


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
