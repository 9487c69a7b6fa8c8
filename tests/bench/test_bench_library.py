"""The library's contracts: what runs inside .venv-vllm imports only the standard library, and
the vLLM launcher skips with a note where .venv-vllm is missing and reads a script's result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.lib import vllm

ROOT = Path(__file__).resolve().parents[2]
VLLM_SIDE = ["bench.lib", "bench.lib.workloads", "bench.lib.metrics", "bench.lib.report",
             "bench.lib.online", "bench.lib.vllm", "bench.lib.ours", "bench.vllm_online",
             "bench.vllm_offline"]
NOT_STDLIB = ["torch", "numpy", "httpx", "infinillm", "vllm", "transformers"]


def test_vllm_side_modules_import_only_the_standard_library():
    code = (f"import importlib, sys\nfor m in {VLLM_SIDE!r}: importlib.import_module(m)\n"
            f"print([m for m in {NOT_STDLIB!r} if m in sys.modules])")
    # -E: no PYTHONPATH; the package comes from the working directory, as in .venv-vllm
    done = subprocess.run([sys.executable, "-E", "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_vllm_block_size_rounds_up_to_what_the_cpu_backend_takes():
    assert [vllm.vllm_block_size(b) for b in (1, 16, 32, 33)] == [32, 32, 32, 64]


def test_api_server_command_carries_the_shared_settings():
    cmd = vllm.api_server_command("/models/m", max_model_len=1024)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag in (["--dtype", "float32"], ["--gpu-memory-utilization", "0.4"],
                 ["--max-model-len", "1024"]):
        i = cmd.index(flag[0])
        assert cmd[i:i + 2] == flag
    assert "--enforce-eager" in cmd and "--no-enable-prefix-caching" in cmd


def test_without_vllm_venv_a_run_is_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(vllm, "VLLM_PYTHON", tmp_path / "missing" / "python")
    assert vllm.run_vllm_script("bench.vllm_online", []) is None
    assert "setup_vllm.sh" in capsys.readouterr().err


def _fake_vllm_script(tmp_path, monkeypatch, body: str) -> None:
    """A module `fake_vllm_side` on PYTHONPATH, run by this interpreter as if it were vLLM's."""
    (tmp_path / "fake_vllm_side.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(vllm, "VLLM_PYTHON", Path(sys.executable))


def test_a_vllm_script_result_line_is_parsed_and_progress_is_passed_on(tmp_path, monkeypatch):
    record = {"engine": "vllm", "online": [1, 2]}
    _fake_vllm_script(tmp_path, monkeypatch, (
        "import json, sys\n"
        "print('p: half way', file=sys.stderr)\n"
        f"print(json.dumps({record!r}, separators=(',', ':')))\n"
        "print('INFO shutting down')\n"))
    said = []
    assert vllm.run_vllm_script("fake_vllm_side", [], "p: ", said.append) == record
    assert said == ["half way"]


def test_a_failed_vllm_script_raises_with_its_output(tmp_path, monkeypatch, capsys):
    _fake_vllm_script(tmp_path, monkeypatch, "print('boom')\nraise SystemExit(3)\n")
    with pytest.raises(SystemExit, match="status 3"):
        vllm.run_vllm_script("fake_vllm_side", [])
    assert "boom" in capsys.readouterr().err
