"""The engine-core process: it builds the ClusterEngine from the config and only steps.

    run_engine_core(config, to_core, from_core, log_level)   # the process's entry point

The API process (client.py) starts it with multiprocessing's spawn and talks to it over two
ZeroMQ PUSH/PULL channels carrying msgspec messages (messages.py); nothing on them is pickled.
The loop is AsyncEngine's, in a process of its own:

    apply every message that arrived -> step (when a request is unfinished) -> send Outputs

Between steps it never blocks; idle, it waits on its channel and on its parent's sentinel, so
that the core ends when the API process is gone however that process ended (no orphan).
Detokenization and stop strings stay with the engine's OutputStream (engine/output.py): the
core sends text deltas, the API process only assembles them.

Signals: SIGINT is ignored (Ctrl-C reaches the whole process group; the API process stops the
core by a Shutdown message, which ends open streams with an error event first); SIGTERM ends
the loop like Shutdown, between two steps. Either way the executor shuts down (Ray actors
included).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

import zmq

from infinillm.config import Config
from infinillm.engine.engine import ClusterEngine
from infinillm.engine.intake import PreparedPrompt
from infinillm.engine.memory import MemoryTrimmer
from infinillm.engine.stats import check_integrity, cluster_stats
from infinillm.server.messages import (
    Abort,
    AddRequest,
    Codec,
    Dead,
    DeltaMaker,
    EngineInfo,
    Outputs,
    Query,
    QueryReply,
    Ready,
    RequestFailure,
    Shutdown,
)
from infinillm.types import RequestId

logger = logging.getLogger("infinillm")

IDLE_POLL_MS = 500  # idle wait on the channel (a message or the parent's end wakes it at once)
TRIM_INTERVAL_S = 30.0

# Inspections the API process may ask for by name (tests, tools): run between steps.
QUERIES: dict[str, Callable[[ClusterEngine], object]] = {
    "cluster_stats": cluster_stats,
    "check_integrity": check_integrity,
    "num_unfinished": lambda engine: len(engine.streams),
}


def run_engine_core(config: Config, to_core: str, from_core: str, log_level: int) -> None:
    """Build the engine, announce it with Ready, step until Shutdown / SIGTERM / the parent's
    end; an engine that fails sends Dead before the process exits.

    As with AsyncEngine in-process, the engine is built on the main thread and stepped on a
    thread of its own. The main thread then only waits and takes the signals, so SIGTERM stops
    the loop between two steps (a flag), never by an exception inside a step. (Measured on the
    2-core machine under load: the same steps ran several times slower when the thread that
    first ran torch's OpenMP code also stepped, so the core keeps the in-process layout.)"""
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    logging.basicConfig(level=log_level, format="[%(name)s] %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    outbox = context.socket(zmq.PUSH)
    for sock in (inbox, outbox):
        sock.setsockopt(zmq.LINGER, 2000)  # what is queued at exit (Dead) still goes out
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    inbox.connect(to_core)
    outbox.connect(from_core)
    codec = Codec()
    try:
        engine = ClusterEngine.from_config(config)
    except ValueError as e:  # the user's config: the API process raises it as such
        outbox.send(codec.encode(Dead(str(e), bad_config=True)))
        _close(context, inbox, outbox)
        return
    except BaseException as e:
        logger.exception("the engine core could not build the engine")
        outbox.send(codec.encode(Dead(f"the engine could not be built: {e!r}")))
        _close(context, inbox, outbox)
        return
    core = EngineCore(engine, inbox, outbox, codec, stop)
    loop = threading.Thread(target=core.run, name="infinillm-engine-core")
    try:
        loop.start()
        while loop.is_alive():
            loop.join(timeout=0.5)  # wakes for signal handlers
    finally:
        engine.shutdown()
        _close(context, inbox, outbox)


def _close(context: zmq.Context, *sockets: zmq.Socket) -> None:
    for sock in sockets:
        sock.close()
    context.term()


class EngineCore:
    def __init__(self, engine: ClusterEngine, inbox: zmq.Socket, outbox: zmq.Socket,
                 codec: Codec, stop: threading.Event) -> None:
        self.engine = engine
        self.stop = stop
        self.inbox = inbox
        self.outbox = outbox
        self.codec = codec
        self.deltas = DeltaMaker()
        self.failures: list[RequestFailure] = []
        self.trimmer = MemoryTrimmer(TRIM_INTERVAL_S)
        self.poller = zmq.Poller()
        self.poller.register(inbox, zmq.POLLIN)
        parent = multiprocessing.parent_process()
        self.parent_sentinel = parent.sentinel if parent is not None else None
        if self.parent_sentinel is not None:
            self.poller.register(self.parent_sentinel, zmq.POLLIN)

    def run(self) -> None:
        self._send(Ready(self._info(), cluster_stats(self.engine)))
        try:
            while not self.stop.is_set():
                busy = self.engine.has_unfinished_requests()
                events = dict(self.poller.poll(0 if busy else IDLE_POLL_MS))
                if self.parent_sentinel in events:
                    logger.warning("engine core: the API process is gone; stopping")
                    return
                changed = self.inbox in events and self._drain()
                if changed is None:  # Shutdown
                    return
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                if changed or outputs or busy:
                    self._publish(outputs)
                self.trimmer.maybe_trim()
        except BaseException as e:  # an engine bug: tell the API process, then end
            logger.exception("engine loop failed")
            self._send(Dead(f"engine loop failed: {e!r}"))

    def _info(self) -> EngineInfo:
        e = self.engine
        return EngineInfo(os.getpid(), str(e.model_path), e.arch.vocab_size, e.max_model_len,
                          e.config.cache.block_size, e.lending, len(e.instances),
                          e.num_blocks_per_instance, e.max_blocks_per_request,
                          e.load_seconds, sorted(e.eos_token_ids))

    def _drain(self) -> bool | None:
        """Apply every message waiting; True if any did, None on Shutdown."""
        applied = False
        while True:
            try:
                frame = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return applied
            message = self.codec.decode_to_core(frame)
            if isinstance(message, Shutdown):
                return None
            self._apply(message)
            applied = True

    def _apply(self, message: AddRequest | Abort | Query) -> None:
        if isinstance(message, AddRequest):
            prepared = PreparedPrompt(message.prompt, message.token_ids, message.params)
            try:
                self.engine.add_prepared(prepared, message.request_id)
            except ValueError as e:  # checked by the API process already; only its client
                self.failures.append(RequestFailure(message.request_id, str(e)))
        elif isinstance(message, Abort):
            for rid in message.request_ids:
                self.engine.abort_request(RequestId(rid))
                self.deltas.forget(rid)
        else:
            self._send(self._answer(message))

    def _answer(self, query: Query) -> QueryReply:
        run = QUERIES.get(query.name)
        if run is None:
            return QueryReply(query.query_id, error=f"unknown query {query.name!r}; the "
                              f"queries are {sorted(QUERIES)}")
        try:
            return QueryReply(query.query_id, value=run(self.engine))
        except Exception as e:
            return QueryReply(query.query_id, error=f"{type(e).__name__}: {e}")

    def _publish(self, outputs: list) -> None:
        failures, self.failures = self.failures, []
        self._send(Outputs([self.deltas.delta(o) for o in outputs], failures,
                           cluster_stats(self.engine), self.engine.max_blocks_per_request))

    def _send(self, message) -> None:
        self.outbox.send(self.codec.encode(message), copy=False)
