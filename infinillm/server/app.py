"""The OpenAI-compatible HTTP app: `create_app(async_engine, model_name)`.

`async_engine` is an AsyncEngine (the engine on a thread of this process) or an EngineClient
(the engine in its own process, server/client.py, the default of `infinillm serve`): the app
uses only what both offer (add_request, stream, abort, cluster_stats, healthy, tokenizer,
max_model_len).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/cluster
(the ledger as JSON), GET /health, GET /metrics (Prometheus), GET / (the live cluster page).

Contract:
- Every error is an OpenAI body `{"error": {"message", "type", "param", "code"}}`: 400 for bad
  JSON, types, values and prompts the cluster cannot hold; 401 for a missing or wrong API key
  (only /v1/* is protected); 404 for an unknown model or route; 413 / 415 for an oversized body
  or a non-JSON content type; 503 when the engine loop is not running. Nothing is queued
  unless the whole request is valid.
- A request with n choices (or a batch of prompts) is n engine requests, all in the same
  continuous batch. Choice i of prompt p has index p * n + i and seed `seed + i`.
- A client that leaves aborts its requests: streams through `EventStream` (which watches for
  `http.disconnect` itself, whatever ASGI spec version the server speaks, and closes the body
  iterator), plain responses through `_unless_disconnected`. AsyncEngine.stream then frees
  their blocks, local and lent, before the next step.
- Text is tokenized off the event loop (asyncio.to_thread): a long prompt never stalls other
  streams, and the engine lock is held only to queue token ids.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from infinillm.engine import AsyncEngine, EngineDeadError
from infinillm.engine.async_engine import EngineRequestError
from infinillm.server import protocol as P
from infinillm.server.choices import ChatShape, CompletionShape, Shape, TokenTexts
from infinillm.server.metrics import CONTENT_TYPE, RequestCounter, ServerMetrics
from infinillm.types import RequestOutput, SamplingParams

if TYPE_CHECKING:
    from infinillm.server.client import EngineClient

logger = logging.getLogger("infinillm")

MAX_BODY_BYTES = 32 << 20
ENDPOINTS = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/cluster",
                       "/v1/completions", "/v1/chat/completions"})
Submission = list[tuple[str, asyncio.Queue]]


def create_app(async_engine: AsyncEngine | EngineClient, model_name: str,
               api_key: str | None = None, *, model_aliases: Iterable[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app; `async_engine` must be started (and is shut down by its owner, not here).
    Requests may name the model as `model_name` or any of `model_aliases`."""
    server = OpenAIServer(async_engine, model_name, set(model_aliases), max_body_bytes)
    app = FastAPI(title="infinillm", docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(RequestCounter, metrics=server.metrics, endpoints=ENDPOINTS)
    _add_error_handlers(app)
    page = resources.files("infinillm.server").joinpath("static/index.html").read_text("utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not async_engine.healthy:
            raise P.APIError(503, "the engine loop is not running", code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await asyncio.to_thread(server.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_checker(api_key))])
    v1.add_api_route("/models", server.models, methods=["GET"])
    v1.add_api_route("/cluster", server.cluster, methods=["GET"])
    v1.add_api_route("/completions", server.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", server.chat_completions, methods=["POST"])
    app.include_router(v1)
    return app


def _key_checker(api_key: str | None) -> Callable[[Request], None]:
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise P.APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                             code="invalid_api_key")

    return check


def _add_error_handlers(app: FastAPI) -> None:
    def render(error: P.APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, exc: P.APIError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path}" if exc.status_code == 404
                   else str(exc.detail))
        return render(P.APIError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return render(P.APIError(400, f"invalid request: {exc.errors()[:3]}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return render(P.APIError(500, f"internal error ({type(exc).__name__}); see the "
                                 "server's log"))


class OpenAIServer:
    """The handlers of /v1, over one AsyncEngine or EngineClient."""

    def __init__(self, async_engine: AsyncEngine | EngineClient, model_name: str, aliases: set[str],
                 max_body_bytes: int) -> None:
        self.engine = async_engine
        self.model_name = model_name
        self.names = {model_name} | aliases
        self.max_body_bytes = max_body_bytes
        self.tokenizer = async_engine.tokenizer
        self.max_model_len = async_engine.max_model_len
        self.created = int(time.time())
        self.metrics = ServerMetrics(async_engine.cluster_stats)
        self.token_texts = TokenTexts(self.tokenizer)
        # A token is at most this many characters: a longer text cannot fit the context.
        self._max_token_chars = (max(map(len, self.tokenizer.backend.get_vocab(True)))
                                 if self.tokenizer is not None else 0)

    # ---- simple endpoints -----------------------------------------------------------------

    async def models(self) -> Response:
        card = P.ModelCard(id=self.model_name, created=self.created,
                           max_model_len=self.max_model_len)
        return _json(P.ModelList(data=[card]))

    async def cluster(self) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(self.engine.cluster_stats))

    # ---- completions and chat completions ------------------------------------------------

    async def completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        req = await self._parse(request, P.CompletionRequest)
        raw_prompts = req.prompts()
        n = req.num_choices
        if len(raw_prompts) * n > P.MAX_CHOICES:  # before tokenizing any of them
            raise P.APIError(400, f"{len(raw_prompts)} prompts x n={n} choices; at most "
                             f"{P.MAX_CHOICES} in all", param="n")
        prompts = [await self._encode(p, "prompt") for p in raw_prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        # echo with max_tokens 0 scores the prompt: the engine generates one token, dropped
        max_tokens = 1 if req.echo_only else (16 if req.max_tokens is None else req.max_tokens)
        params = [self._params(req, ids, max_tokens, i) for ids in prompts for i in range(n)]
        echoes = None
        if req.echo:
            texts = [await self._echo_text(raw, ids) for raw, ids in zip(raw_prompts, prompts)]
            echoes = [t for t in texts for _ in range(n)]
        shape = CompletionShape(self.token_texts, echoes, req.echo_only)
        sub = self._submit(rid, [ids for ids in prompts for _ in range(n)], params)
        num_prompt = sum(map(len, prompts))
        if req.stream:
            chunks = P.CompletionChunks(rid, self.model_name)
            return self._stream(req, sub, arrival, num_prompt, chunks, shape)
        outs = await _unless_disconnected(request, self._collect(sub, arrival))
        choices = [P.CompletionChoice(index=i, text=shape.text(i, o),
                                      logprobs=_all_logprobs(shape, i, o),
                                      finish_reason=shape.finish_reason(o))
                   for i, o in enumerate(outs)]
        usage = P.Usage.of(num_prompt, sum(map(shape.num_generated, outs)),
                           _num_cached(outs, n))
        return _json(P.CompletionResponse(id=rid, model=self.model_name, choices=choices,
                                          usage=usage))

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        req = await self._parse(request, P.ChatCompletionRequest)
        if self.tokenizer is None or not self.tokenizer.has_chat_template:
            raise P.APIError(400, f"model {self.model_name!r} has no chat template; use "
                             "/v1/completions", param="messages")
        ids = await self._encode([m.as_template_message() for m in req.messages], "messages")
        max_tokens = req.max_new_tokens or self.max_model_len - len(ids)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        params = [self._params(req, ids, max_tokens, i) for i in range(req.num_choices)]
        sub = self._submit(rid, [ids] * req.num_choices, params)
        shape = ChatShape(self.token_texts)
        if req.stream:
            chunks = P.ChatChunks(rid, self.model_name)
            return self._stream(req, sub, arrival, len(ids), chunks, shape)
        outs = await _unless_disconnected(request, self._collect(sub, arrival))
        choices = [P.ChatChoice(index=i, message=P.AssistantMessage(content=shape.text(i, o)),
                                logprobs=_all_logprobs(shape, i, o),
                                finish_reason=shape.finish_reason(o))
                   for i, o in enumerate(outs)]
        return _json(P.ChatCompletionResponse(id=rid, model=self.model_name, choices=choices,
                                              usage=P.Usage.of(len(ids), _num_generated(outs),
                                                               _num_cached(outs, len(outs)))))

    def _stream(self, req: P.SamplingRequest, sub: Submission, arrival: float,
                num_prompt: int, chunks: P.CompletionChunks, shape: Shape) -> EventStream:
        events = self._events(sub, arrival, num_prompt, req.include_usage, chunks, shape,
                              req.num_choices)
        return EventStream(events, on_close=lambda: self._abort(sub))

    async def _events(self, sub: Submission, arrival: float, num_prompt: int,
                      include_usage: bool, chunks: P.CompletionChunks,
                      shape: Shape, num_choices: int = 1) -> AsyncIterator[str]:
        """Text deltas of every choice as the engine produces them (with the logprobs of the
        tokens new since the last event, when asked for), then usage, then [DONE]."""
        sent = [0] * len(sub)  # characters of text sent, per choice
        sent_entries = [0] * len(sub)  # logprob entries sent
        offsets = [0] * len(sub)  # completions' text_offset of the next entry
        finals: list[RequestOutput | None] = [None] * len(sub)
        try:
            for event in chunks.start(len(sub)):
                yield event
            async for i, out in self._merged(sub, arrival):
                text = shape.text(i, out)
                delta, sent[i] = text[sent[i]:], len(text)
                entries, logprobs = shape.entries(i, out), None
                if entries is not None and len(entries) > sent_entries[i]:
                    logprobs, offsets[i] = shape.logprobs(entries[sent_entries[i]:], offsets[i])
                    sent_entries[i] = len(entries)
                if out.finished:
                    finals[i] = out
                reason = shape.finish_reason(out)
                if delta or reason or logprobs is not None:
                    yield chunks.delta(i, delta, reason, logprobs)
            if include_usage:
                yield chunks.usage(P.Usage.of(num_prompt, sum(map(shape.num_generated, finals)),
                                              _num_cached(finals, num_choices)))
        except EngineDeadError as e:
            yield P.sse(P.APIError(503, str(e), code="engine_unavailable").body())
        except EngineRequestError as e:
            yield P.sse(P.APIError(400, str(e)).body())
        yield P.SSE_DONE

    # ---- shared steps ---------------------------------------------------------------------

    async def _parse(self, request: Request, model: type[P.RequestModel]) -> P.RequestModel:
        """Read, type-check and validate a JSON body; check the model name."""
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise P.APIError(415, f"Content-Type must be application/json, got {ctype!r}")
        body = await _read_body(request, self.max_body_bytes)
        try:
            req = model.model_validate_json(body)
        except ValidationError as e:
            raise P.validation_error(e) from None
        if req.model_extra:  # accepted and ignored; named in the log to help find typos
            names = sorted(req.model_extra)
            logger.warning("ignored %d unknown request field(s): %s", len(names),
                           ", ".join(repr(name[:40]) for name in names[:8]))
        if req.model is not None and req.model not in self.names:
            raise P.APIError(404, f"model {req.model!r} is not served here; this server serves "
                             f"{self.model_name!r}", param="model", code="model_not_found")
        return req

    async def _encode(self, prompt: str | list[int] | list[dict], param: str) -> list[int]:
        """Token ids of a text prompt, a chat (messages), or ids as they are. Templates and
        tokenization run in a worker thread; ids are range-checked by the engine."""
        if isinstance(prompt, list) and (not prompt or not isinstance(prompt[0], dict)):
            return prompt
        if self.tokenizer is None:
            raise P.APIError(400, f"model {self.model_name!r} has no tokenizer; send token ids",
                             param=param)
        return await asyncio.to_thread(self._tokenize, prompt, param)

    async def _echo_text(self, prompt: str | list[int], ids: list[int]) -> str:
        """The text echoed before a completion: the prompt as sent, or its ids decoded."""
        if isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            return ""
        return await asyncio.to_thread(self.tokenizer.decode, ids, False)

    def _tokenize(self, prompt: str | list[dict], param: str) -> list[int]:
        tok = self.tokenizer
        add_special = isinstance(prompt, str)  # a chat template places the special tokens
        if not add_special:
            # The template only adds text: check the messages' own length before rendering.
            self._check_chars(sum(len(m["content"]) for m in prompt), param)
            try:
                prompt = tok.apply_chat_template(prompt)
            except ValueError as e:
                raise P.APIError(400, str(e), param=param) from None
        self._check_chars(len(prompt), param)
        return tok.encode(prompt, add_special_tokens=add_special)

    def _check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_model_len * self._max_token_chars:
            raise P.APIError(400, f"prompt has {num_chars} characters, more than the model's "
                             f"context of {self.max_model_len} tokens can hold", param=param)

    def _params(self, req: P.SamplingRequest, ids: list[int], max_tokens: int,
                index: int) -> SamplingParams:
        if not ids:
            raise P.APIError(400, "prompt is empty", param="prompt")
        if len(ids) >= self.max_model_len or len(ids) + max_tokens > self.max_model_len:
            raise P.APIError(400, f"this model's context is {self.max_model_len} tokens; the "
                             f"request has {len(ids)} prompt tokens and asks for {max_tokens} "
                             "more", param="max_tokens", code="context_length_exceeded")
        try:
            return req.sampling_params(index, max_tokens)
        except ValueError as e:
            raise P.APIError(400, str(e), param=_param_named(str(e))) from None

    def _submit(self, rid: str, prompts: list[list[int]],
                params: list[SamplingParams]) -> Submission:
        """Queue one engine request per choice: all of them, or none (400 / 503)."""
        sub: Submission = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                sub.append(self.engine.add_request(ids, p, f"{rid}-{i}"))
        except (ValueError, EngineDeadError) as e:
            self._abort(sub)
            if isinstance(e, EngineDeadError):
                raise P.APIError(503, str(e), code="engine_unavailable") from None
            raise P.APIError(400, str(e), param=_param_named(str(e), "prompt")) from None
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return sub

    def _abort(self, sub: Submission) -> None:
        for rid, _ in sub:
            self.engine.abort(rid)

    async def _merged(self, sub: Submission,
                      arrival: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, cumulative output) of all choices as they come; records TTFT and
        TPOT. Leaving early (close, cancel, error) aborts every unfinished choice."""
        merged: asyncio.Queue = asyncio.Queue()
        started: set[int] = set()  # their AsyncEngine.stream aborts them when cancelled

        async def pump(i: int, rid: str, queue: asyncio.Queue) -> None:
            started.add(i)
            try:
                async for out in self.engine.stream(rid, queue):
                    merged.put_nowait((i, out))
            except Exception as e:  # EngineDeadError: hand it to the consumer
                merged.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, rid, q)) for i, (rid, q) in enumerate(sub)]
        first: dict[int, float] = {}
        done: set[int] = set()
        try:
            while len(done) < len(sub):
                i, out = await merged.get()
                if isinstance(out, BaseException):
                    raise out
                self._record(i, out, arrival, first)
                if out.finished:
                    done.add(i)
                yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._abort([s for i, s in enumerate(sub) if i not in done and i not in started])

    def _record(self, i: int, out: RequestOutput, arrival: float,
                first: dict[int, float]) -> None:
        now = time.perf_counter()
        n = len(out.outputs[0].token_ids)
        if n and i not in first:
            first[i] = now
            self.metrics.ttft.observe(now - arrival)
        if out.finished:
            self.metrics.generation_tokens.inc(n)
            if n > 1:
                self.metrics.tpot.observe((now - first[i]) / (n - 1))

    async def _collect(self, sub: Submission, arrival: float) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(sub)
        try:
            async for i, out in self._merged(sub, arrival):
                finals[i] = out
        except EngineDeadError as e:
            raise P.APIError(503, str(e), code="engine_unavailable") from None
        except EngineRequestError as e:
            raise P.APIError(400, str(e)) from None
        return finals


class EventStream(StreamingResponse):
    """Server-sent events that end, and abort their requests, when the client leaves.

    Starlette listens for `http.disconnect` only under ASGI spec < 2.4 and otherwise relies on
    `send` raising OSError, which happens only when the next event is sent (not while a request
    waits for its first token). This class always races the stream against the disconnect and
    closes the event generator however the response ends (its finally blocks abort the
    requests); `on_close` aborts them when the generator never started.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(self._tracked(content),
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close
        self.content_started = False

    async def _tracked(self, content: AsyncIterator[str]) -> AsyncIterator[str]:
        self.content_started = True
        try:
            async for event in content:
                yield event
        finally:
            await content.aclose()

    async def __call__(self, scope, receive, send) -> None:
        sender = asyncio.ensure_future(self.stream_response(send))
        listener = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, listener):
                task.cancel()
            await asyncio.gather(sender, listener, return_exceptions=True)
            await self.body_iterator.aclose()
            if not self.content_started:
                self.on_close()
        error = None if sender.cancelled() else sender.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: the client left
            raise error


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise P.APIError(413, f"request body of {declared} bytes is over the limit of {limit}",
                         code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise P.APIError(413, f"request body is over the limit of {limit} bytes",
                                 code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise P.APIError(499, "the client closed the request", code="client_closed") from None
    return b"".join(chunks)


async def _unless_disconnected(request: Request, work):
    """Await `work` unless the client disconnects first (then cancel it: its requests abort).
    The body has been read, so the next ASGI message is the disconnect (or the end)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():  # nobody reads this reply; the metrics count it as 499
        raise P.APIError(499, "the client closed the request", code="client_closed")
    return task.result()


_FIELDS = (set(P.CompletionRequest.model_fields) | set(P.ChatCompletionRequest.model_fields)) \
    - {"prompt", "messages"}


_ENGINE_NAMES = {"json_schema": "response_format"}  # SamplingParams' name -> the API's


def _param_named(message: str, default: str | None = None) -> str | None:
    """The request field an engine ValueError is about: its messages start with the name of
    the value they refuse ("min_tokens must be ...", "logit_bias token ids ...")."""
    word = message.split(" ", 1)[0]
    word = _ENGINE_NAMES.get(word, word)
    return word if word in _FIELDS else default


def _all_logprobs(shape: Shape, i: int, out: RequestOutput):
    """A plain response's logprobs object for choice i, or None when not asked for."""
    entries = shape.entries(i, out)
    return None if entries is None else shape.logprobs(entries, 0)[0]


def _num_generated(outs: Iterable[RequestOutput | None]) -> int:
    return sum(len(o.outputs[0].token_ids) for o in outs if o is not None)


def _num_cached(outs: list[RequestOutput | None], num_choices: int) -> int:
    """Cached prompt tokens for usage: each prompt's once (its first choice), as prompt_tokens
    counts each prompt once whatever `n`."""
    return sum(o.num_cached_tokens for o in outs[::num_choices] if o is not None)


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")
