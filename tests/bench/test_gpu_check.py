"""bench/gpu_check.py's code on CPU tensors (`--device cpu --quick`): every part runs, and
its checks hold (transformers' logits and tokens, borrowing equal to one instance, blocked
attention equal to contiguous SDPA), so the GPU run is not its first run."""

from __future__ import annotations

import json

import pytest

from bench import gpu_check


@pytest.mark.slow
def test_quick_cpu_run_passes_every_part(capsys):
    status = gpu_check.main(["--device", "cpu", "--quick", "--budget-scale", "3"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert (status, result["errors"], result["failed"], result["ok"]) == (0, {}, [], True)
    assert result["device"] == "cpu" and result["env"]["auto_backend"] == "cpu_flash"
    attention = result["attention"]
    assert attention["max_abs_diff"] < 1e-4 and attention["blocked_s"] > 0
    assert set(result["throughput"]) == {"1", "4"}
    assert "vllm not installed" in out  # vLLM is never run on CPU tensors by this check
    assert all(v["measured_s"] > 0 and v["predicted_s"] > 0 for v in result["sim"].values())
    for line in ("tiny llama float32", "tiny llama bfloat16", "tokens equal"):
        assert line in out
