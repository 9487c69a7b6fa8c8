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

from infinillm.cli import _listen, build_parser, config_kwargs, main, served_model_name
from infinillm.config import Config


def test_serve_flags_and_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.executor, args.num_instances) == ("127.0.0.1", 8000,
                                                                          "inproc", 1)
    args = build_parser().parse_args(["serve", "--instances", "2", "--kv-blocks", "64",
                                      "--api-key", "k", "--port", "0", "--block-size", "8"])
    assert (args.num_instances, args.kv_blocks_per_instance, args.api_key, args.block_size) == (
        2, 64, "k", 8)
    args = build_parser().parse_args(["serve", "--executor", "ray", "--ray-address", "auto"])
    assert (args.executor, args.ray_address) == ("ray", "auto")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--executor", "mpi"])
    assert build_parser().parse_args(["generate", "hi"]).command == "generate"


@pytest.mark.parametrize(
    "argv, settings",
    [
        (["--kv-memory-gb", "0.5"], {"kv_cache_memory_bytes": 1 << 29}),
        (["--kv-cache-memory-bytes", "512MiB"], {"kv_cache_memory_bytes": 512 << 20}),
        (["--kv-cache-memory-bytes", "1000"], {"kv_cache_memory_bytes": 1000}),
        (["--kv-memory-gb", "1", "--kv-cache-memory-bytes", "2G"],
         {"kv_cache_memory_bytes": 2 << 30}),
        (["--threads", "2", "--num-instances", "3"], {"num_threads": 2, "num_instances": 3}),
        (["--kv-blocks-per-instance", "7"], {"kv_blocks_per_instance": 7}),
        (["--max-lent-fraction", "0.25", "--dist-timeout-s", "5"],
         {"max_lent_fraction": 0.25, "dist_timeout_s": 5.0}),
        (["--no-lending", "--device", "cuda", "--model", "/m"],
         {"lending": False, "device": "cuda", "model": "/m"}),
    ],
)
def test_engine_flags_are_typed_settings(argv, settings):
    kwargs = config_kwargs(build_parser().parse_args(["serve", *argv]))
    assert {name: kwargs[name] for name in settings} == settings
    assert all(type(kwargs[name]) is type(value) for name, value in settings.items())
    config = Config.from_kwargs(**kwargs)
    assert config.cache.kv_cache_memory_bytes == kwargs["kv_cache_memory_bytes"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block-size", "big"], "argument --block-size: invalid int value: 'big'"),
        (["--kv-cache-memory-bytes", "2XB"],
         "argument --kv-cache-memory-bytes: expected a size such as 2GiB"),
        (["--kv-memory-gb", "lots"], "argument --kv-memory-gb: expected a number of GiB"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--kv-blocks"], "argument --kv-blocks-per-instance/--kv-blocks: expected one argument"),
    ],
)
def test_bad_flag_text_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block-size", "0"], "block_size must be positive, got 0"),
        (["--max-lent-fraction", "1.5"], "max_lent_fraction must be in [0, 1], got 1.5"),
        (["--num-threads", "0"], "num_threads must be positive, got 0"),
    ],
)
def test_invalid_settings_exit_2_with_one_line(argv, message, capsys):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert main(["generate", "hi", *argv]) == 2
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert capsys.readouterr().err == f"infinillm: error: {message}\n"


def test_help_has_a_group_per_section(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for heading in ("model:", "cache:", "scheduler:", "runtime:", "cluster:", "server:"):
        assert f"\n{heading}\n" in text
    for flag in ("--num-instances N, --instances N", "--no-lending", "--kv-memory-gb GIB",
                 "--kv-cache-memory-bytes SIZE", "(unset: 2GiB on CPU; on CUDA what",
                 "--recall-blocks-per-step N"):
        assert flag in " ".join(text.split())  # as wrapped to any terminal width


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
        core = int(re.search(r"engine core pid (\d+)", "".join(banner))[1])
        assert core != proc.pid and _alive(core)
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
    assert not _alive(core), "the engine core process outlived the server"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            _listen("127.0.0.1", port)
    with pytest.raises(ValueError, match="--port"):
        _listen("127.0.0.1", 70000)
