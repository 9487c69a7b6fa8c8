"""`infinillm serve`: flags, the start-up banner, one request, and a clean Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from infinillm.cli import _listen, build_parser, served_model_name


def test_serve_flags_and_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.executor, args.instances) == ("127.0.0.1", 8000,
                                                                      "inproc", 1)
    args = build_parser().parse_args(["serve", "--instances", "2", "--kv-blocks", "64",
                                      "--api-key", "k", "--port", "0", "--block-size", "8"])
    assert (args.instances, args.kv_blocks, args.api_key, args.block_size) == (2, 64, "k", 8)
    args = build_parser().parse_args(["serve", "--executor", "ray", "--ray-address", "auto"])
    assert (args.executor, args.ray_address) == ("ray", "auto")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--executor", "mpi"])
    assert build_parser().parse_args(["generate", "hi"]).command == "generate"


def test_served_model_name(tmp_path):
    assert served_model_name(None) == "SmolLM2-135M-Instruct"
    assert served_model_name(str(tmp_path / "My-Model")) == "My-Model"
    assert served_model_name(str(tmp_path / "My-Model") + "/") == "My-Model"
    assert served_model_name("/models/tiny.Q4_0.gguf") == "tiny.Q4_0"


def test_serve_starts_answers_and_stops_on_ctrl_c():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINILLM_API_KEY": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "infinillm.cli", "serve", "--port", "0", "--instances", "2",
         "--kv-blocks", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = []
        deadline = time.monotonic() + 120
        while not any("curl" in line for line in banner):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            banner.append(proc.stdout.readline())
        url = re.search(r"OpenAI API at (http://127\.0\.0\.1:\d+)/v1", "".join(banner))[1]
        reply = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": "SmolLM2-135M-Instruct", "prompt": "Hello",
                                 "max_tokens": 3, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130, -signal.SIGINT), stderr
    assert "server stopped" in stderr and "Traceback" not in stderr, stderr


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            _listen("127.0.0.1", port)
    with pytest.raises(ValueError, match="--port"):
        _listen("127.0.0.1", 70000)
