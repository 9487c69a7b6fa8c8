"""One live server for all server tests: the default model (it has a tokenizer and a chat
template), two instances with small pools so that long prompts borrow blocks, an AsyncEngine,
and uvicorn on a free loopback port in a background thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from infinillm import LLM
from infinillm.engine import AsyncEngine
from infinillm.server import create_app

MODEL = "SmolLM2-135M-Instruct"
BLOCKS_PER_INSTANCE = 48  # 768 tokens of 16: a prompt of ~1,000 tokens borrows


@dataclass
class Served:
    url: str
    async_engine: AsyncEngine
    llm: LLM
    model: str = MODEL

    def cluster(self) -> dict:
        return httpx.get(f"{self.url}/v1/cluster", timeout=60).json()

    # Freeing takes one step (~30 ms here; aborts are applied between steps); the slack is
    # for a loaded CI machine.
    def wait_all_free(self, timeout: float = 5.0) -> dict:
        """Poll /v1/cluster until every pool is full and no request is left."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.cluster()
            idle = all(i["free_blocks"] == i["total_blocks"] and not i["running"]
                       and not i["waiting"] for i in stats["instances"])
            if (idle and not stats["debts"]) or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def assert_idle(self, timeout: float = 5.0) -> None:
        """Within `timeout`, every pool is full again; then the engine's own check passes."""
        assert_all_free(self.wait_all_free(timeout))
        self.async_engine.check_integrity()


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
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def served():
    llm = LLM(kv_blocks_per_instance=BLOCKS_PER_INSTANCE, num_instances=2)
    async_engine = AsyncEngine(llm.engine)
    async_engine.start()
    app = create_app(async_engine, MODEL)
    server, thread, url = start_uvicorn(app)
    yield Served(url, async_engine, llm)
    server.should_exit = True
    thread.join(timeout=10)
    async_engine.shutdown()
