"""One live server for all server tests, as `infinillm serve` runs: the default model (it has a
tokenizer and a chat template), two instances with small pools so that long prompts borrow
blocks, the engine in an engine-core process of its own behind an EngineClient, and uvicorn on
a free loopback port in a background thread. (The in-process AsyncEngine behind the same app is
served by test_server_hostile.py and tests/engine/test_async_engine.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from infinillm.config import Config
from infinillm.model.tokenizer import Tokenizer
from infinillm.server import create_app
from infinillm.server.client import EngineClient

MODEL = "SmolLM2-135M-Instruct"
BLOCKS_PER_INSTANCE = 48  # 768 tokens of 16: a prompt of ~1,000 tokens borrows
# Waits are polls for a condition under a deadline, never fixed sleeps. What they wait for
# takes a step or two (~30 ms each here); the deadline is only there to fail rather than hang,
# so it is generous for a loaded CI machine.
WAIT_S = 60.0
POLL_S = 0.02
T = TypeVar("T")


@dataclass
class Served:
    url: str
    async_engine: EngineClient
    tokenizer: Tokenizer | None
    model: str = MODEL
    stop: Callable[[], None] = lambda: None  # uvicorn, then the core; idempotent

    def cluster(self) -> dict:
        return httpx.get(f"{self.url}/v1/cluster", timeout=60).json()

    def requests_by_status(self, endpoint: str) -> dict[str, float]:
        """The server's own count of finished HTTP requests to `endpoint`, by status; a request
        is counted once the app is done with it (a disconnect's abort included)."""
        text = httpx.get(f"{self.url}/metrics", timeout=60).text
        return {s.labels["status"]: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "infinillm_http_requests_total"
                and s.labels["endpoint"] == endpoint}

    def wait_requests_done(self, endpoint: str, before: dict[str, float]) -> dict[str, float]:
        """Wait until the server has finished more requests to `endpoint` than `before` (from
        `requests_by_status`) says; returns, per status, how many more."""
        after = poll(lambda: self.requests_by_status(endpoint), lambda now: now != before,
                     what=f"a request to {endpoint} to finish")
        return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}

    def wait_for(self, what: str, done: Callable[[dict], bool]) -> dict:
        """Poll /v1/cluster until `done(stats)`; fail with `what` after WAIT_S seconds."""
        return poll(self.cluster, done, what=what)

    def wait_all_free(self, timeout: float = WAIT_S) -> dict:
        """Poll /v1/cluster until every pool is full and no request is left."""
        def idle(stats: dict) -> bool:
            return not stats["debts"] and all(
                i["free_blocks"] == i["total_blocks"] and not i["running"] and not i["waiting"]
                for i in stats["instances"])
        return poll(self.cluster, idle, timeout, fail=False)

    def assert_idle(self, timeout: float = WAIT_S) -> None:
        """Within `timeout`, every pool is full again; then the engine's own check passes."""
        assert_all_free(self.wait_all_free(timeout))
        self.async_engine.check_integrity()


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float = WAIT_S,
         what: str = "", fail: bool = True) -> T:
    """Read until `done(value)` or `timeout` seconds pass; return the last value. A deadline
    only bounds the wait (nothing assumes that time has passed): on timeout it fails with
    `what` and the last value, or returns that value when `fail` is False."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            assert not fail, f"timed out after {timeout} s waiting for {what}: {value!r}"
            return value
        time.sleep(POLL_S)


def assert_all_free(stats: dict) -> None:
    for inst in stats["instances"]:
        assert inst["free_blocks"] == inst["total_blocks"], stats
        assert inst["lent_blocks"] == inst["borrowed_blocks"] == 0, stats
        assert inst["running"] == inst["waiting"] == 0, stats
    assert stats["debts"] == [], stats


def start_uvicorn(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    # uvicorn exposes no start event: poll its flag (and fail at once if its thread died).
    def started(up: bool) -> bool:
        assert thread.is_alive(), "uvicorn's thread ended before it started"
        return up
    poll(lambda: server.started, started, what="uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def served_config(**settings) -> Config:
    return Config.from_kwargs(kv_blocks_per_instance=BLOCKS_PER_INSTANCE, num_instances=2,
                              **settings)


@pytest.fixture(scope="session")
def serve_engine():
    """`serve_engine(config, model_name)` -> Served: an EngineClient (a core process of its
    own) behind the app on uvicorn. `Served.stop()` stops it; the session's end stops the rest."""
    stops = []

    def start(config: Config, model_name: str = MODEL) -> Served:
        client = EngineClient(config)
        try:
            server, thread, url = start_uvicorn(create_app(client, model_name))
        except BaseException:
            client.shutdown()
            raise

        def stop() -> None:
            server.should_exit = True
            thread.join(timeout=10)
            client.shutdown()

        stops.append(stop)
        return Served(url, client, client.tokenizer, model_name, stop)

    yield start
    for stop in stops:
        stop()


@pytest.fixture(scope="session")
def served(serve_engine):
    return serve_engine(Config.from_kwargs(kv_blocks_per_instance=BLOCKS_PER_INSTANCE,
                                           num_instances=2))
