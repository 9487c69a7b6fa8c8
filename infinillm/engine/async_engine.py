"""AsyncEngine: the ClusterEngine driven by a background thread, for asyncio servers.

The engine loop (schedule -> run -> update) runs in its own thread, apart from the HTTP event
loop, so that every concurrent stream joins one continuous batch and slow clients never stall
the batch. The event loop never waits for a step: new requests and aborts are validated on the
caller's thread, then queued as commands that the engine thread applies between steps; the
cluster's stats are published by the engine thread after each step.

    rid, queue = async_engine.add_request(prompt, params)   # ValueError: nothing queued
    async for out in async_engine.stream(rid, queue):        # cumulative RequestOutputs
        ...

If the consumer stops iterating (a client disconnects, the task is cancelled), the request is
aborted and its blocks, local and lent, are freed before the next step.

Threads: the map from request id to its client's queue is shared by the event loop (register,
abort) and the engine thread (deliver, fail). One lock guards it together with the `closed` flag,
and every access is a single get / pop-if-present inside that lock, so an abort that lands while
an output is being delivered costs nothing but a dropped output. Registration checks `closed` in
the same critical section in which the failure path sets it: a request is either registered
before the engine fails (and gets the failure as its error) or refused with EngineDeadError;
it never waits on a queue that nobody will fill.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from infinillm.engine.engine import ClusterEngine
from infinillm.engine.memory import MemoryTrimmer
from infinillm.types import RequestId, RequestOutput, SamplingParams

logger = logging.getLogger("infinillm")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or an internal error); servers answer 503."""


class EngineRequestError(RuntimeError):
    """The engine refused one request after it was accepted (only its client); servers
    answer 400."""


class RequestStreams:
    """`generate` and `stream` over `add_request` and `abort`, shared by the engine thread
    (AsyncEngine) and the engine-core client (server/client.py): a request's outputs arrive on
    its asyncio.Queue, and an error put there is raised to the consumer."""

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> tuple[RequestId, asyncio.Queue]:
        raise NotImplementedError

    def abort(self, request_id: RequestId) -> None:
        raise NotImplementedError

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        rid, queue = self.add_request(prompt, params, request_id)
        async for out in self.stream(rid, queue):
            yield out

    async def stream(self, rid: RequestId, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Outputs of a request added with `add_request`; aborts it if the consumer leaves."""
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)


class AsyncEngine(RequestStreams):
    """`trim_interval_s`: how often the engine thread hands freed native memory back to the
    system (engine/memory.py); None never."""

    def __init__(self, engine: ClusterEngine, trim_interval_s: float | None = 30.0) -> None:
        self.engine = engine
        self._trimmer = MemoryTrimmer(trim_interval_s) if trim_interval_s else None
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # guards _queues and _closed (see the module docstring)
        self._queues: dict[RequestId, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False  # set once by _fail_all; no queue is registered afterwards
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stats: dict = engine.cluster_stats()
        self.error: BaseException | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="infinillm-engine",
                                            daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def healthy(self) -> bool:
        return (self.error is None and not self._closed and self._thread is not None
                and self._thread.is_alive())

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._run_commands()
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out)
                    self._stats = self.engine.cluster_stats()
                else:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                if self._trimmer is not None:
                    self._trimmer.maybe_trim()
        except BaseException as e:  # an engine bug: report it to every waiting client
            logger.exception("engine loop failed")
            self.error = e
            self._fail_all(EngineDeadError(f"engine loop failed: {e!r}"))
            return
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _run_commands(self) -> None:
        ran = False
        while self._commands:
            self._commands.popleft()()
            ran = True
        if ran:
            self._stats = self.engine.cluster_stats()

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self._wake.set()

    def _deliver(self, out: RequestOutput) -> None:
        rid, finished = out.request_id, out.finished
        with self._lock:
            target = self._queues.pop(rid, None) if finished else self._queues.get(rid)
        if target is not None:  # None: the client left (abort) before this output
            _post(target, out)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self._closed = True
            targets = list(self._queues.values())
            self._queues.clear()
        for target in targets:
            _post(target, error)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> tuple[RequestId, asyncio.Queue]:
        """Validate and queue a request (call from the event loop). ValueError for bad input
        and EngineDeadError when the loop is not running; nothing is queued then."""
        if not self.healthy:
            raise self._dead_error()
        prepared = self.engine.prepare(prompt, params)  # reads config only: thread-safe
        rid = RequestId(request_id if request_id is not None else f"req-{next(self._ids)}")
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise self._dead_error()
            if rid in self._queues:
                raise ValueError(f"request id {rid!r} is already in use")
            self._queues[rid] = (loop, queue)
        self._submit(lambda: self.engine.add_prepared(prepared, rid))
        return rid, queue

    def _dead_error(self) -> EngineDeadError:
        if self.error is not None:
            return EngineDeadError(f"the engine loop failed: {self.error!r}")
        return EngineDeadError("the engine is not running")

    def abort(self, request_id: RequestId) -> None:
        """Abort a request before the next step; returns at once."""
        with self._lock:
            self._queues.pop(request_id, None)
        self._submit(lambda: self.engine.abort_request(request_id))

    # ---- inspection -----------------------------------------------------------------------

    def cluster_stats(self) -> dict:
        """The stats as of the last step or command (never waits for a step)."""
        return self._stats

    def call(self, fn: Callable[[ClusterEngine], object], timeout: float = 60.0):
        """Run `fn(engine)` on the engine thread between steps and return its result (for
        tests and tools; blocks the caller)."""
        if not self.healthy:
            return fn(self.engine)
        done: Future = Future()

        def run() -> None:
            try:
                done.set_result(fn(self.engine))
            except BaseException as e:
                done.set_exception(e)

        self._submit(run)
        return done.result(timeout)

    def check_integrity(self) -> None:
        self.call(lambda engine: engine.check_integrity())


def _post(target: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item: object) -> None:
    """Put `item` on a client's queue from any thread."""
    loop, queue = target
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the event loop is closed: nobody is listening
        pass
