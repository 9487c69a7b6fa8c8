"""The engine in its own process (server/core.py behind server/client.py's EngineClient):
greedy tokens through the process and the `openai` client equal Hugging Face transformers'
own, an abort crosses to the core and frees every block (read from the core by a query), and a
core that is killed or shut down answers 503 to waiting and new requests, never a hang; a Ray
executor runs behind the core (which starts and stops its actors).

The kill and shutdown tests each start a core of their own on a tiny random Llama (the shared
`served` core must live on)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time

import httpx
import openai
import pytest
import torch

from infinillm.config import Config
from infinillm.server.client import EngineClient
from infinillm.types import SamplingParams

TINY = "tiny"
TINY_BLOCKS = 8  # 128 tokens of 16 per instance: a 200-token prompt borrows
DEADLINE_S = 60.0  # bounds every wait: a hang fails the test instead of stalling the suite
# logprobs: without a tokenizer a stream's text is empty; its logprobs make an event per token.
LONG = {"model": TINY, "prompt": [5, 6, 7], "max_tokens": 400, "temperature": 0,
        "ignore_eos": True, "logprobs": 0}


@pytest.fixture(scope="module")
def tiny_served(serve_engine, tiny_llama):
    served = serve_engine(Config.from_kwargs(model=tiny_llama, num_instances=2,
                                             kv_blocks_per_instance=TINY_BLOCKS), TINY)
    yield served
    served.stop()


@pytest.fixture
def own_core(serve_engine, tiny_llama):
    """A core of its own, to be killed or stopped by the test (two LONG requests fit at once)."""
    served = serve_engine(Config.from_kwargs(model=tiny_llama, kv_blocks_per_instance=64), TINY)
    yield served
    served.stop()


def _hf_greedy(folder: str, prompt: list[int], n: int) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_tokens_through_the_process_equal_transformers(tiny_served, tiny_llama):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 200)]
    before = tiny_served.cluster()["remote_attention_calls"]
    client = openai.OpenAI(base_url=f"{tiny_served.url}/v1", api_key="unused", max_retries=0,
                           timeout=DEADLINE_S)
    reply = client.completions.create(model=TINY, prompt=prompts, max_tokens=8, temperature=0,
                                      logprobs=0, extra_body={"ignore_eos": True})
    # Without a tokenizer a token's text is "token_id:N": the ids cross back exactly.
    got = [[int(t.split(":")[1]) for t in c.logprobs.tokens] for c in reply.choices]
    assert got == [_hf_greedy(tiny_llama, p, 8) for p in prompts]
    assert tiny_served.cluster()["remote_attention_calls"] > before  # the long one borrowed
    tiny_served.assert_idle()


def test_abort_crosses_to_the_core_and_frees_every_block(tiny_served):
    client = tiny_served.async_engine
    prompt = list(range(10, 210))  # 200 tokens: more than one instance's pool

    async def leave_after_two_tokens() -> dict:
        rid, queue = client.add_request(prompt, SamplingParams(max_tokens=30, temperature=0,
                                                               ignore_eos=True))
        stream = client.stream(rid, queue)
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                break
        # Read from the core itself, between its steps: the request holds lent blocks.
        stats = await asyncio.to_thread(client.call, "cluster_stats")
        assert not out.finished
        await stream.aclose()  # the consumer leaves: the abort crosses to the core
        return stats

    busy = asyncio.run(asyncio.wait_for(leave_after_two_tokens(), DEADLINE_S))
    assert sum(i["running"] for i in busy["instances"]) == 1, busy
    assert sum(i["lent_blocks"] for i in busy["instances"]) > 0, busy

    def idle(stats: dict) -> bool:
        return all(i["free_blocks"] == i["total_blocks"] and not i["running"]
                   for i in stats["instances"]) and not stats["debts"]

    _poll(lambda: client.call("cluster_stats"), idle)
    assert client.call("num_unfinished") == 0
    client.check_integrity()


def _poll(read, done):
    """Read until `done(value)`; fail after DEADLINE_S (a deadline, not a sleep)."""
    deadline = time.monotonic() + DEADLINE_S
    while not done(value := read()):
        assert time.monotonic() < deadline, f"timed out: {value!r}"
        time.sleep(0.02)
    return value


async def _stream_until_first_token(http: httpx.AsyncClient, body: dict):
    """Open a stream and read up to its first text event; returns the response's line iterator."""
    request = http.build_request("POST", "/v1/completions", json={**body, "stream": True})
    response = await http.send(request, stream=True)
    assert response.status_code == 200
    lines = response.aiter_lines()
    async for line in lines:
        if line.startswith("data: {"):
            return response, lines
    raise AssertionError("the stream ended before its first event")


async def _wait_running(served, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while sum(i["running"] for i in served.async_engine.cluster_stats()["instances"]) < count:
        assert asyncio.get_running_loop().time() < deadline, "requests never ran"
        await asyncio.sleep(0.02)


async def _rest(lines) -> list[str]:
    return [line[6:] for line in [line async for line in lines] if line.startswith("data: ")]


def _assert_503(events: list[str]) -> None:
    """A stream cut by the engine's end: an OpenAI error event (503), then [DONE]."""
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_unavailable", error


def test_a_killed_core_gives_503s_and_never_hangs(own_core, caplog):
    client = own_core.async_engine

    async def go():
        async with httpx.AsyncClient(base_url=own_core.url, timeout=DEADLINE_S) as http:
            plain = asyncio.create_task(http.post("/v1/completions", json=LONG))
            response, lines = await _stream_until_first_token(http, LONG)
            await _wait_running(own_core, 2)
            os.kill(client.info.pid, signal.SIGKILL)
            events = await _rest(lines)
            await response.aclose()
            after = await http.post("/v1/completions", json={**LONG, "max_tokens": 2})
            return events, await plain, after, await http.get("/health")

    with caplog.at_level(logging.ERROR, logger="infinillm"):
        events, plain, after, health = asyncio.run(asyncio.wait_for(go(), DEADLINE_S))
    _assert_503(events)
    for r in (plain, after, health):
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
    assert "died" in plain.json()["error"]["message"]
    assert client.process.exitcode == -signal.SIGKILL and not client.healthy
    died = [r for r in caplog.records if "died" in r.getMessage()]
    assert len(died) == 1, [r.getMessage() for r in caplog.records]


def test_shutdown_ends_open_streams_and_joins_the_core(own_core):
    client = own_core.async_engine

    async def go():
        async with httpx.AsyncClient(base_url=own_core.url, timeout=DEADLINE_S) as http:
            response, lines = await _stream_until_first_token(http, LONG)
            await asyncio.to_thread(client.shutdown)
            events = await _rest(lines)
            await response.aclose()
            return events, await http.get("/health")

    events, health = asyncio.run(asyncio.wait_for(go(), DEADLINE_S))
    _assert_503(events)
    assert health.status_code == 503
    assert client.process.exitcode == 0  # it stopped on the Shutdown message, not a signal


@pytest.mark.ray
@pytest.mark.slow  # a Ray cluster and its actors, started by the core process
def test_the_core_process_owns_a_ray_executor(tiny_llama):
    from infinillm import LLM

    settings = dict(block_size=4, kv_blocks_per_instance=14, num_instances=2,
                    max_num_batched_tokens=16)
    gen = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (70, 9)]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    # The in-process engine (itself checked against transformers in tests/engine).
    expected = [o.outputs[0].token_ids
                for o in LLM(tiny_llama, **settings).generate(batch, greedy, use_tqdm=False)]
    client = EngineClient(Config.from_kwargs(model=tiny_llama, executor="ray",
                                             dist_timeout_s=5.0, **settings))

    async def generate(prompt: list[int]) -> list[int]:
        outs = [o async for o in client.generate(prompt, greedy)]
        return outs[-1].outputs[0].token_ids

    async def both() -> list[list[int]]:
        return list(await asyncio.gather(*map(generate, batch)))

    try:
        assert asyncio.run(asyncio.wait_for(both(), 4 * DEADLINE_S)) == expected
        # 70 tokens are more than one pool of 14 blocks of 4: blocks were borrowed across actors
        assert client.call("cluster_stats")["remote_attention_calls"] > 0
        client.check_integrity()
    finally:
        client.shutdown()
    assert client.process.exitcode == 0
