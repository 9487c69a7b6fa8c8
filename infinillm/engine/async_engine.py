"""AsyncEngine: the ClusterEngine driven by a background thread, for asyncio servers.

The engine loop (schedule -> run -> update) runs in its own thread, apart from the HTTP event
loop, so that every concurrent stream joins one continuous batch and slow clients never stall
the batch. Callers on the event loop add requests and iterate their outputs:

    async for out in async_engine.generate(prompt, params):
        ...                       # cumulative RequestOutput; out.finished on the last one

Bad input raises ValueError from `generate` before anything is queued. If the consumer stops
iterating (a client disconnects, the task is cancelled), the request is aborted and its blocks,
local and lent, are freed before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from infinillm.engine.engine import ClusterEngine
from infinillm.types import RequestId, RequestOutput, SamplingParams

logger = logging.getLogger("infinillm")


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error; the server should report 500/503."""


class AsyncEngine:
    def __init__(self, engine: ClusterEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # guards every call into `engine`
        self._wake = threading.Event()
        self._stop = False
        self._queues: dict[RequestId, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
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
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        try:
            while not self._stop:
                with self._lock:
                    busy = self.engine.has_unfinished_requests()
                    outputs = self.engine.step() if busy else []
                if not busy:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in outputs:
                    self._deliver(out)
        except BaseException as e:  # an engine bug: report it to every waiting client
            logger.exception("engine loop failed")
            self.error = e
            self._fail_all(EngineDeadError(f"engine loop failed: {e!r}"))
            return
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _deliver(self, item: RequestOutput) -> None:
        target = self._queues.get(item.request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass

    def _fail_all(self, error: BaseException) -> None:
        for loop, queue in list(self._queues.values()):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            except RuntimeError:
                pass

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> tuple[RequestId, asyncio.Queue]:
        """Queue a request; ValueError for bad input (nothing queued)."""
        if not self.healthy:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            prepared = self.engine.prepare(prompt, params)
            rid = self.engine.add_prepared(prepared, request_id)
            self._queues[rid] = (loop, queue)
        self._wake.set()
        return rid, queue

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
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: RequestId) -> None:
        with self._lock:
            self.engine.abort_request(request_id)

    # ---- inspection -----------------------------------------------------------------------

    def cluster_stats(self) -> dict:
        with self._lock:
            return self.engine.cluster_stats()

    def check_integrity(self) -> None:
        with self._lock:
            self.engine.check_integrity()
