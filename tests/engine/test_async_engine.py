"""AsyncEngine between two threads: clients that leave at any moment, even while the engine
thread delivers their last output, cost nothing but that output; a request added while the
engine fails gets an error, never a hang.

The moments are forced, not hoped for: the engine thread reads an output's `finished` flag
inside `AsyncEngine._deliver`, and the test's outputs run a hook at that read which makes the
client leave (its task is cancelled on the event loop) and waits until it has left. Timeouts
only bound a wait so that a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from infinillm import LLM, SamplingParams
from infinillm.engine import AsyncEngine, EngineDeadError

GUARD_S = 30.0  # a failure guard: every wait here ends within a few steps
NUM_CLIENTS = 300
BLOCK_SIZE = 8
BLOCKS_PER_INSTANCE = 16  # 128 tokens: a few concurrent requests fill a pool and borrow


class LeavingOutput:
    """A RequestOutput whose `finished` flag, the first time it is read (by the engine thread,
    inside `_deliver`), first runs `hook`."""

    __slots__ = ("_out", "_hook")

    def __init__(self, out, hook) -> None:
        self._out, self._hook = out, hook

    def __getattr__(self, name: str):
        return getattr(self._out, name)

    @property
    def finished(self) -> bool:
        hook, self._hook = self._hook, None
        if hook is not None:
            hook()
        return self._out.finished


@pytest.fixture
def async_engine(tiny_llama):
    llm = LLM(tiny_llama, num_instances=2, block_size=BLOCK_SIZE,
              kv_blocks_per_instance=BLOCKS_PER_INSTANCE, max_num_batched_tokens=64)
    engine = AsyncEngine(llm.engine)
    engine.start()
    yield engine
    engine.shutdown()
    llm.shutdown()


def _hook_step(async_engine: AsyncEngine, wrap) -> None:
    """Make the engine's step pass each of its outputs through `wrap(out)`."""
    engine = async_engine.engine
    step = engine.step
    engine.step = lambda: [wrap(out) for out in step()]


def test_clients_leaving_at_any_moment_while_borrowing(async_engine):
    rng = random.Random(0)
    engine = async_engine.engine
    vocab = engine.arch.vocab_size
    # Per client: prompt length, max_tokens, and when it leaves: ("end", None) reads to the
    # end; ("after", k) leaves after seeing k tokens (0: before the first output); ("forced",
    # k) leaves while the engine thread delivers the output that brings k tokens, k ==
    # max_tokens being the output that finishes the request.
    plans = []
    for i in range(NUM_CLIENTS):
        max_tokens = rng.randint(1, 12)
        kind = rng.choice(["end", "after", "forced", "forced"])
        k = None
        if kind == "after":
            k = rng.randint(0, max_tokens - 1)
        elif kind == "forced":
            k = max_tokens if rng.random() < 0.5 else rng.randint(1, max_tokens)
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(20, 90))]
        plans.append((f"c{i}", prompt, max_tokens, kind, k))
    forced = {rid: k for rid, _, _, kind, k in plans if kind == "forced"}
    fired: dict[str, bool] = {}  # rid -> the hook ran on the finishing output
    tasks: dict[str, asyncio.Task] = {}
    max_lent = 0

    async def main() -> dict[str, object]:
        nonlocal max_lent
        loop = asyncio.get_running_loop()

        def leave_now(rid: str, finishing: bool) -> None:
            # On the engine thread, between its read of the queue map and its removal of the
            # finished entry: the client's task is cancelled on the loop (its stream aborts).
            left = threading.Event()

            def cancel() -> None:
                tasks[rid].add_done_callback(lambda _: left.set())
                tasks[rid].cancel()

            loop.call_soon_threadsafe(cancel)
            assert left.wait(GUARD_S), f"client {rid} did not leave"
            fired[rid] = finishing

        def wrap(out):
            k = forced.get(out.request_id)
            if k is None or out.request_id in fired or len(out.outputs[0].token_ids) < k:
                return out
            return LeavingOutput(out, lambda: leave_now(out.request_id, out.finished))

        _hook_step(async_engine, wrap)

        async def client(rid, prompt, max_tokens, kind, k):
            nonlocal max_lent
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            rid, queue = async_engine.add_request(prompt, params, rid)
            if kind == "after" and k == 0:
                async_engine.abort(rid)
                return "left"
            stream = async_engine.stream(rid, queue)
            last = None
            try:
                async for out in stream:
                    last = out
                    stats = async_engine.cluster_stats()
                    max_lent = max(max_lent, sum(i["lent_blocks"] for i in stats["instances"]))
                    if kind == "after" and len(out.outputs[0].token_ids) >= k:
                        return "left"
            finally:
                await stream.aclose()
            return last

        for plan in plans:
            tasks[plan[0]] = asyncio.create_task(client(*plan))
        done = await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True),
                                      GUARD_S * 4)
        return dict(zip(tasks, done))

    results = asyncio.run(main())

    errors = {rid: r for rid, r in results.items()
              if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)}
    assert not errors, f"{len(errors)} clients failed, e.g. {next(iter(errors.values()))!r}"
    assert async_engine.healthy, async_engine.error
    assert max_lent > 0, "no block was ever lent: the test does not exercise borrowing"
    assert set(fired) == set(forced), "every forced client must have left during a delivery"
    assert any(fired.values()), "no client left while its finishing output was delivered"
    for rid, _, max_tokens, kind, _ in plans:
        r = results[rid]
        if kind == "end":
            assert r.finished and r.outputs[0].finish_reason == "length", (rid, r)
            assert len(r.outputs[0].token_ids) == max_tokens, (rid, r)
        elif kind == "after":
            assert r == "left", (rid, r)
        else:
            assert isinstance(r, asyncio.CancelledError), (rid, r)

    # The aborts were queued before this call (every client is done): it runs after them.
    unfinished, free = async_engine.call(
        lambda e: (e.has_unfinished_requests(), e.num_free_blocks()), GUARD_S)
    assert not unfinished
    assert free == [BLOCKS_PER_INSTANCE] * 2
    async_engine.check_integrity()

    async def one_more() -> list:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        return [out async for out in async_engine.generate([1, 2, 3], params)]

    outs = asyncio.run(asyncio.wait_for(one_more(), GUARD_S))
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3


def test_a_request_added_while_the_engine_fails_gets_an_error(async_engine):
    engine = async_engine.engine
    step, prepare = engine.step, engine.prepare
    failing = threading.Event()

    def failing_step():
        if failing.is_set():
            raise RuntimeError("injected step failure")
        return step()

    def prepare_while_failing(prompt, params):
        # Runs inside add_request, after its health check and before the queue is
        # registered: the engine fails here, and its thread has ended before this returns.
        prepared = prepare(prompt, params)
        if prompt == [9, 9, 9]:
            failing.set()
            async_engine._thread.join(GUARD_S)
            assert not async_engine._thread.is_alive(), "the engine thread did not end"
        return prepared

    engine.step = failing_step
    engine.prepare = prepare_while_failing
    long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)

    async def main():
        rid, queue = async_engine.add_request([1, 2, 3], long)
        first = await asyncio.wait_for(queue.get(), GUARD_S)  # the engine is stepping
        assert not isinstance(first, BaseException), first
        with pytest.raises(EngineDeadError, match="injected step failure"):
            rid2, queue2 = async_engine.add_request([9, 9, 9], long)
            # A registered request gets the error on its queue; the guard only bounds a hang.
            item = await asyncio.wait_for(queue2.get(), GUARD_S / 3)
            raise item
        with pytest.raises(EngineDeadError, match="injected step failure"):
            async for _ in async_engine.stream(rid, queue):
                pass
        with pytest.raises(EngineDeadError):
            async_engine.add_request([4, 5, 6], long)

    asyncio.run(main())
    assert not async_engine.healthy
