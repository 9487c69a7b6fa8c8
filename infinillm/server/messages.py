"""The messages between the API process and the engine-core process, and their one codec.

Two ZeroMQ PUSH/PULL channels, one each way (the API process binds both, the core connects):

    API -> core:  AddRequest | Abort | Query | Shutdown
    core -> API:  Ready (once, when the engine is built) | Outputs (after every step or command
                  that changed something) | QueryReply | Dead (the engine failed; the core exits)

Payloads are msgspec Structs encoded as MessagePack; nothing is pickled. `SamplingParams` and
`RequestOutput` (infinillm/types.py) cross as the dataclasses they are: msgspec encodes every
field and decodes into the dataclass (running its `__post_init__` checks), so a field added to
either crosses with no code here.

Outputs carry deltas: per request, the text, token ids and logprobs new since its last output,
the prompt logprobs once, and no prompt (the API process has it). `OutputMerger` rebuilds the
cumulative `RequestOutput`s that `AsyncEngine` streams; any other field crosses as its latest
value. A step's outputs of a batch cost O(new tokens), not O(tokens so far).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from infinillm.types import CompletionOutput, RequestOutput, SamplingParams

# ---- API process -> engine core ------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True):
    """A prompt the API process validated (engine/intake.py `prepare`), to be admitted."""

    request_id: str
    prompt: str | None
    token_ids: list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Query(msgspec.Struct, tag=True):
    """Run a named inspection (core.py QUERIES) between steps; answered by a QueryReply."""

    query_id: int
    name: str


class Shutdown(msgspec.Struct, tag=True):
    pass


ToCore = AddRequest | Abort | Query | Shutdown

# ---- engine core -> API process ------------------------------------------------------------


class EngineInfo(msgspec.Struct):
    """What the API process needs to validate and tokenize prompts and describe the cluster."""

    pid: int
    model_path: str
    vocab_size: int
    max_model_len: int
    block_size: int
    lending: bool
    num_instances: int
    num_blocks_per_instance: int
    max_blocks_per_request: int
    load_seconds: float
    eos_token_ids: list[int] = []  # what a grammar allows once the value is complete


class Ready(msgspec.Struct, tag=True):
    info: EngineInfo
    stats: dict[str, Any]


class RequestFailure(msgspec.Struct):
    """A request the engine could not take (only its client hears of it)."""

    request_id: str
    message: str


class Outputs(msgspec.Struct, tag=True):
    """One step's (or command's) news: output deltas, failed requests, the cluster stats after
    it, and how many blocks a new request may have now (fewer once instances are lost)."""

    outputs: list[RequestOutput]
    failures: list[RequestFailure]
    stats: dict[str, Any]
    max_blocks_per_request: int


class QueryReply(msgspec.Struct, tag=True):
    query_id: int
    value: Any = None
    error: str | None = None


class Dead(msgspec.Struct, tag=True):
    """The engine stopped for good: `bad_config` when it could not be built from the config
    (the API process raises ValueError), else an internal error."""

    message: str
    bad_config: bool = False


FromCore = Ready | Outputs | QueryReply | Dead


class Codec:
    """MessagePack encoding of every message; decoding checks the types (a malformed frame
    raises msgspec.DecodeError / ValidationError, never runs code)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._to_core = msgspec.msgpack.Decoder(ToCore)
        self._from_core = msgspec.msgpack.Decoder(FromCore)

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)

    def decode_to_core(self, frame: bytes) -> ToCore:
        return self._to_core.decode(frame)

    def decode_from_core(self, frame: bytes) -> FromCore:
        return self._from_core.decode(frame)


# ---- output deltas -------------------------------------------------------------------------

_GROWING = ("text", "token_ids", "logprobs")  # CompletionOutput fields sent as deltas


@dataclasses.dataclass(slots=True)
class _Sent:
    """How much of each completion of one request the API process has (engine-core side)."""

    lengths: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    prompt_logprobs: bool = False


class DeltaMaker:
    """Engine-core side: turns cumulative RequestOutputs into deltas, in place (the engine
    builds a fresh output every step; its lists are not touched, only replaced)."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def delta(self, out: RequestOutput) -> RequestOutput:
        sent = self._sent.setdefault(out.request_id, _Sent())
        for i, c in enumerate(out.outputs):
            if i == len(sent.lengths):
                sent.lengths.append((0, 0, 0))
            chars, tokens, logprobs = sent.lengths[i]
            sent.lengths[i] = (len(c.text), len(c.token_ids),
                               0 if c.logprobs is None else len(c.logprobs))
            c.text, c.token_ids = c.text[chars:], c.token_ids[tokens:]
            if c.logprobs is not None:
                c.logprobs = c.logprobs[logprobs:]
        if out.prompt_logprobs is not None:
            if sent.prompt_logprobs:
                out.prompt_logprobs = None
            sent.prompt_logprobs = True
        out.prompt, out.prompt_token_ids = None, []
        if out.finished:
            del self._sent[out.request_id]
        return out

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)


class OutputMerger:
    """API-process side: one request's deltas back into cumulative RequestOutputs (a fresh
    object each time, as the in-process engine gives)."""

    def __init__(self, prompt: str | None, prompt_token_ids: list[int]) -> None:
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.outputs: list[CompletionOutput] = []
        self.prompt_logprobs: list | None = None

    def merge(self, delta: RequestOutput) -> RequestOutput:
        outputs = []
        for i, c in enumerate(delta.outputs):
            if i == len(self.outputs):
                self.outputs.append(dataclasses.replace(c, text="", token_ids=[],
                                                        logprobs=None))
            acc = self.outputs[i]
            for f in dataclasses.fields(c):  # every other field: its latest value
                if f.name not in _GROWING:
                    setattr(acc, f.name, getattr(c, f.name))
            acc.text += c.text
            acc.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                if acc.logprobs is None:
                    acc.logprobs = []
                acc.logprobs.extend(c.logprobs)
            outputs.append(dataclasses.replace(
                acc, token_ids=list(acc.token_ids),
                logprobs=None if acc.logprobs is None else list(acc.logprobs)))
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        return dataclasses.replace(delta, prompt=self.prompt,
                                   prompt_token_ids=self.prompt_token_ids, outputs=outputs,
                                   prompt_logprobs=self.prompt_logprobs)
