"""EngineClient: AsyncEngine's interface over an engine-core process (core.py).

    client = EngineClient(config)              # spawns the core, waits until its engine is built
    rid, queue = client.add_request(ids, params)
    async for out in client.stream(rid, queue): # cumulative RequestOutputs, as AsyncEngine's
        ...
    client.shutdown()                          # Shutdown message, join; terminate, kill if stuck

The API process keeps what is cheap and per request: the tokenizer (the server tokenizes and
renders token texts) and an Intake with the engine's fixed facts, so a bad prompt raises
ValueError on the caller's thread, before anything is sent, exactly as with AsyncEngine.

One reader thread owns the receiving socket: it decodes each Outputs message, merges the deltas
into cumulative outputs and hands them to the clients' asyncio queues (one callback per event
loop per message). It also watches the core's process sentinel: when the core dies, however it
dies, every waiting request and query gets EngineDeadError (the server answers 503), `healthy`
turns false, and one error line is logged. The sending socket is shared by the event loop
(requests, aborts) and by threads (queries, shutdown) under a lock.

The queue map and `closed` flag follow AsyncEngine's locking (engine/async_engine.py): a request
is registered before the engine dies (and gets the failure) or refused with EngineDeadError.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import tempfile
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path

import zmq

from infinillm.config import Config
from infinillm.engine.async_engine import EngineDeadError, EngineRequestError, RequestStreams
from infinillm.engine.grammar import StructuredOutput
from infinillm.engine.intake import Intake
from infinillm.model.tokenizer import Tokenizer
from infinillm.server.core import run_engine_core
from infinillm.server.messages import (
    Abort,
    AddRequest,
    Codec,
    Dead,
    EngineInfo,
    OutputMerger,
    Outputs,
    Query,
    QueryReply,
    Ready,
    Shutdown,
)
from infinillm.types import RequestId, SamplingParams

logger = logging.getLogger("infinillm")

JOIN_TIMEOUT_S = 30.0  # a core that does not stop after Shutdown is terminated, then killed
READER_POLL_MS = 500


class EngineClient(RequestStreams):
    """`start_timeout_s`: how long the core may take to build the engine (loading weights)."""

    def __init__(self, config: Config, start_timeout_s: float = 600.0) -> None:
        self.config = config
        self.codec = Codec()
        self._folder = tempfile.TemporaryDirectory(prefix="infinillm-")
        base = Path(self._folder.name) / uuid.uuid4().hex[:8]
        self._context = zmq.Context()
        self._outbox = self._socket(zmq.PUSH, f"ipc://{base}-to-core")
        self._inbox = self._socket(zmq.PULL, f"ipc://{base}-from-core")
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _queues, _replies and _closed
        self._queues: dict[RequestId, tuple[asyncio.AbstractEventLoop, asyncio.Queue,
                                            OutputMerger]] = {}
        self._replies: dict[int, Future] = {}
        self._closed = False
        self._stopping = False
        self._ids = itertools.count()
        self._query_ids = itertools.count()
        self.error: str | None = None
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=run_engine_core, name="infinillm-engine-core", daemon=True,
            args=(config, f"ipc://{base}-to-core", f"ipc://{base}-from-core",
                  logging.getLogger("infinillm").getEffectiveLevel()))
        self.process.start()
        try:
            ready = self._wait_ready(start_timeout_s)
        except BaseException:
            self._stop_process(0.0)
            self._close_sockets()
            raise
        self.info: EngineInfo = ready.info
        self._stats: dict = ready.stats
        self._max_blocks = ready.info.max_blocks_per_request
        path = Path(ready.info.model_path)
        self.tokenizer = (Tokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file()
                          else None)
        self.intake = Intake(self.tokenizer, path, ready.info.vocab_size,
                             ready.info.max_model_len, ready.info.block_size,
                             ready.info.lending, lambda: self._max_blocks)
        # JSON schemas compile here too, so a bad one is a 400 before anything is sent
        self.structured = StructuredOutput(self.tokenizer, ready.info.vocab_size,
                                           ready.info.eos_token_ids)
        self._reader = threading.Thread(target=self._read, name="infinillm-engine-client",
                                        daemon=True)
        self._reader.start()

    def _socket(self, kind: int, address: str) -> zmq.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(address)
        return sock

    def _wait_ready(self, timeout_s: float) -> Ready:
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        if not poller.poll(timeout_s * 1000):
            raise RuntimeError(f"the engine core did not start within {timeout_s} s")
        if self._inbox.poll(0):
            message = self.codec.decode_from_core(self._inbox.recv())
            if isinstance(message, Ready):
                return message
            if isinstance(message, Dead):  # the core exits by itself after sending it
                self.process.join(JOIN_TIMEOUT_S)
                raise (ValueError if message.bad_config else RuntimeError)(message.message)
        self.process.join(5)
        raise RuntimeError(f"the engine core process exited with code {self.process.exitcode} "
                           "before its engine was built (see its log above)")

    # ---- the interface of AsyncEngine -----------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def healthy(self) -> bool:
        return not self._closed and self.process.is_alive()

    def start(self) -> None:
        """Nothing to do: the core runs from construction (AsyncEngine's interface)."""

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> tuple[RequestId, asyncio.Queue]:
        """Validate and send a request (call from the event loop). ValueError for bad input
        and EngineDeadError when the core is not running; nothing is sent then."""
        if not self.healthy:
            raise self._dead_error()
        prepared = self.intake.prepare(prompt, params)
        self.structured.check(prepared.params)
        rid = RequestId(request_id if request_id is not None else f"req-{next(self._ids)}")
        queue: asyncio.Queue = asyncio.Queue()
        merger = OutputMerger(prepared.text, prepared.token_ids)
        with self._lock:
            if self._closed:
                raise self._dead_error()
            if rid in self._queues:
                raise ValueError(f"request id {rid!r} is already in use")
            self._queues[rid] = (asyncio.get_running_loop(), queue, merger)
        self._send(AddRequest(rid, prepared.text, prepared.token_ids, prepared.params))
        return rid, queue

    def abort(self, request_id: RequestId) -> None:
        """Abort a request before the core's next step; returns at once."""
        with self._lock:
            self._queues.pop(request_id, None)
        if self.healthy:
            try:
                self._send(Abort([request_id]))
            except zmq.ZMQError:  # closed by a shutdown in between: nothing left to free
                pass

    def cluster_stats(self) -> dict:
        """The stats the core sent after its last step or command (never waits)."""
        return self._stats

    def call(self, name: str, timeout: float = 60.0):
        """The result of the core's query `name` (core.py QUERIES), run between steps (for
        tests and tools; blocks the caller). EngineDeadError if the core is gone."""
        done: Future = Future()
        query_id = next(self._query_ids)
        with self._lock:
            if self._closed:
                raise self._dead_error()
            self._replies[query_id] = done
        self._send(Query(query_id, name))
        return done.result(timeout)

    def check_integrity(self) -> None:
        self.call("check_integrity")

    def shutdown(self) -> None:
        """Stop the core (open requests end with EngineDeadError) and join it. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self.process.is_alive():
            try:
                self._send(Shutdown())
            except zmq.ZMQError:
                pass
        self._stop_process(JOIN_TIMEOUT_S)
        self._reader.join(timeout=10)
        self._fail_all(EngineDeadError("the engine was shut down"))
        self._close_sockets()

    # ---- the reader thread ----------------------------------------------------------------

    def _read(self) -> None:
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(READER_POLL_MS))
                if self._inbox in events and self._drain():
                    return
                if self.process.sentinel in events and not self._inbox.poll(0):
                    self._core_ended()
                    return
        except BaseException as e:  # a bug here must not leave clients waiting
            logger.exception("engine client reader failed")
            self.error = f"engine client reader failed: {e!r}"
            self._fail_all(EngineDeadError(self.error))

    def _drain(self) -> bool:
        """Handle every message waiting; True when the core announced its death."""
        while True:
            try:
                frame = self._inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            message = self.codec.decode_from_core(frame)
            if isinstance(message, Outputs):
                self._deliver(message)
            elif isinstance(message, QueryReply):
                self._reply(message)
            elif isinstance(message, Dead):
                self.error = message.message
                logger.error("engine core failed: %s; answering 503 to every request",
                             message.message)
                self._fail_all(EngineDeadError(f"the engine loop failed: {message.message}"))
                return True

    def _core_ended(self) -> None:
        self.process.join(5)
        if self._stopping:
            self._fail_all(EngineDeadError("the engine was shut down"))
            return
        with self._lock:
            waiting = len(self._queues)
        self.error = (f"the engine core process (pid {self.process.pid}) died with exit code "
                      f"{self.process.exitcode}")
        logger.error("%s; answering 503 to its %d waiting request(s) and to every new one",
                     self.error, waiting)
        self._fail_all(EngineDeadError(self.error))

    def _deliver(self, message: Outputs) -> None:
        self._stats = message.stats
        self._max_blocks = message.max_blocks_per_request
        posts: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            targets = [(self._queues.pop(d.request_id, None) if d.finished
                        else self._queues.get(d.request_id), d) for d in message.outputs]
            failed = [(self._queues.pop(RequestId(f.request_id), None), f)
                      for f in message.failures]
        for target, delta in targets:
            if target is not None:  # None: the client left (abort) before this output
                loop, queue, merger = target
                posts.setdefault(loop, []).append((queue, merger.merge(delta)))
        for target, failure in failed:
            if target is not None:
                loop, queue, _ = target
                posts.setdefault(loop, []).append((queue, EngineRequestError(failure.message)))
        for loop, items in posts.items():
            _post_all(loop, items)

    def _reply(self, reply: QueryReply) -> None:
        with self._lock:
            done = self._replies.pop(reply.query_id, None)
        if done is None:
            return
        if reply.error is not None:
            done.set_exception(RuntimeError(reply.error))
        else:
            done.set_result(reply.value)

    def _fail_all(self, error: EngineDeadError) -> None:
        with self._lock:
            self._closed = True
            targets = list(self._queues.values())
            replies = list(self._replies.values())
            self._queues.clear()
            self._replies.clear()
        posts: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, queue, _ in targets:
            posts.setdefault(loop, []).append((queue, error))
        for loop, items in posts.items():
            _post_all(loop, items)
        for done in replies:
            if not done.done():
                done.set_exception(error)

    def _dead_error(self) -> EngineDeadError:
        if self.error is not None:
            return EngineDeadError(self.error)
        return EngineDeadError("the engine is not running")

    # ---- plumbing -------------------------------------------------------------------------

    def _send(self, message) -> None:
        frame = self.codec.encode(message)
        with self._send_lock:
            self._outbox.send(frame, copy=False)

    def _stop_process(self, timeout_s: float) -> None:
        self.process.join(timeout_s)
        if self.process.is_alive():
            logger.warning("the engine core did not stop within %.0f s; terminating it",
                           timeout_s)
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def _close_sockets(self) -> None:
        with self._send_lock:
            self._outbox.close()
        self._inbox.close()
        self._context.term()
        self._folder.cleanup()


def _post_all(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    """Put each item on its queue from any thread, in one callback of the queues' loop."""
    def put() -> None:
        for queue, item in items:
            queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # the event loop is closed: nobody is listening
        pass
