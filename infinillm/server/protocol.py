"""The OpenAI API's request and response bodies, as pydantic models.

Requests are validated strictly (`model_validate_json(..., strict)`): a JSON string is not a
number, `true` is not 1, NaN and infinities are refused (the server turns every
`ValidationError` into HTTP 400 with the field in `param` and the offending value in the
message). JSON nested deeper than the parser's recursion limit (a few hundred levels) is
malformed JSON. Unknown top-level fields are accepted and ignored (kept in `model_extra` only
so that the server can log their names), as OpenAI-compatible clients send fields of newer API
versions and of other servers. Fields of the OpenAI API that we accept but do not implement
(suffix, tools, ...) are declared so that their neutral values pass and anything else fails
with a clear message. `response_format` (chat and, as vLLM accepts it, completions) is OpenAI's:
`text`, `json_object`, `json_schema` (the engine compiles the schema; engine/grammar.py).
vLLM extensions accepted: `top_k`, `ignore_eos`,
`stop_token_ids`, `include_stop_str_in_output`, `repetition_penalty`, `min_tokens`.

Responses follow the OpenAI shapes field for field (`null` where OpenAI sends null), so that the
official client parses them.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from infinillm.types import SamplingParams

MAX_CHOICES = 128  # OpenAI's own limit on n; also caps prompts x n of a batch
MAX_STOP = 16
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs, and vLLM's default max_logprobs
# Temperatures below this are greedy (vLLM does the same): dividing logits by a tiny
# temperature overflows float32 and turns the softmax into NaN.
GREEDY_EPS = 1e-5


class APIError(Exception):
    """An error the client caused (or 5xx), rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_error(error: ValidationError) -> APIError:
    """A pydantic ValidationError as a 400: up to three problems, `param` their common field."""
    problems = error.errors(include_url=False)
    if any(p["type"] == "json_invalid" for p in problems):
        return APIError(400, f"malformed JSON body: {problems[0]['msg']}", code="invalid_json")
    locs = [_loc(p) for p in problems]
    common: list[Any] = []
    for parts in zip(*locs):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    param = ".".join(str(x) for x in common) or None
    lines = []
    for p, loc in zip(problems[:3], locs):
        if p["type"] == UNSUPPORTED:  # the message names the field and its value
            lines.append(p["msg"])
            continue
        where = ".".join(str(x) for x in loc) or "body"
        got = "" if p["type"] == "missing" else f" (got {_short(p.get('input'))})"
        lines.append(f"{where}: {p['msg']}{got}")
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return APIError(400, "; ".join(lines) + more, param=param)


def _loc(problem: dict) -> tuple:
    param = (problem.get("ctx") or {}).get("param")
    return (param,) if param is not None else tuple(problem["loc"])


UNSUPPORTED = "unsupported_value"


def unsupported(param: str, value: Any, message: str) -> PydanticCustomError:
    """A request-level check's error that names its field (`param`) and the value; raise it from
    a model validator (whose errors would otherwise point at the whole body)."""
    # The template is formatted with the context: only "{param}" is replaced, braces stay.
    text = f"{param} {message} (got {_short(value)})"
    return PydanticCustomError(UNSUPPORTED, text, {"param": param})


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- requests ------------------------------------------------------------------------------

class RequestModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(RequestModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's; accepted, ignored


class SamplingRequest(RequestModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids written as decimal strings, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"bias of token {key} must be in [-100, 100], got {value!r}")
        return bias

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingRequest:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise unsupported("stop", f"{len(self.stop)} strings",
                              f"takes at most {MAX_STOP} strings")
        if self.stream_options is not None and not self.stream:
            raise unsupported("stream_options", self.stream_options.model_dump(exclude_none=True),
                              "is only allowed when stream is true")
        json_schema(self.response_format)  # checks its shape
        return self

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, index: int, max_tokens: int) -> SamplingParams:
        """The engine's parameters for choice `index` (a seed becomes seed + index, so that
        the n choices of one seeded request differ and each is reproducible)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature < GREEDY_EPS else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=None if self.seed is None else self.seed + index,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=bool(self.ignore_eos),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            min_tokens=self.min_tokens or 0,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            logprobs=self.num_logprobs,
            prompt_logprobs=self.num_prompt_logprobs,
            json_schema=json_schema(self.response_format),
        )

    @property
    def num_logprobs(self) -> int | None:
        """Top logprobs per generated token; None: no logprobs."""
        return None

    @property
    def num_prompt_logprobs(self) -> int | None:
        return None


def json_schema(response_format: dict[str, Any] | None) -> str | None:
    """OpenAI's `response_format` -> the JSON schema the output must follow, as JSON text (None:
    free text). `json_object` is any JSON object; `json_schema` takes `json_schema.schema` (a
    JSON object), whatever `strict` says (it is always enforced), and requires `name` as OpenAI
    does. A shape error is a 400 naming response_format; whether the schema compiles is the
    engine's check."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type": "object"}'
    if kind != "json_schema":
        raise unsupported("response_format", response_format,
                          "type must be 'text', 'json_object' or 'json_schema'")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise unsupported("response_format", response_format,
                          "of type json_schema needs a json_schema object")
    name = spec.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise unsupported("response_format", response_format,
                          "json_schema.name must be a string of 1 to 64 characters")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise unsupported("response_format", response_format,
                          "json_schema.strict must be a boolean")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise unsupported("response_format", response_format,
                          "json_schema.schema must be a JSON schema (an object)")
    return json.dumps(schema)


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    # 0 only with echo: the prompt (and its logprobs) is scored, nothing is generated
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported_completion(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only allowed with echo (to score the prompt)")
        if self.best_of not in (None, self.num_choices):
            raise unsupported("best_of", self.best_of, "is not supported (only equal to n)")
        if self.suffix:
            raise unsupported("suffix", self.suffix, "is not supported")
        return self

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the engine generates one token, which is dropped."""
        return bool(self.echo) and self.max_tokens == 0

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one, or a batch (a list of strings or of id lists)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return list(p)
        return [p]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra keys (name, refusal, annotations, ... of an echoed reply) are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if self.role == "developer" else self.role
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _unsupported_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        for name, neutral in (("tools", (None, [])), ("tool_choice", (None, "none"))):
            if getattr(self, name) not in neutral:
                raise unsupported(name, getattr(self, name), "is not supported")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses -----------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: per token its text, logprob (null for the first prompt
    token), the top alternatives with the token itself (text -> logprob; null with the first
    prompt token), and the character offset where it starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Both the whole response and, with object "text_completion", each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "infinillm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- server-sent events ----------------------------------------------------------------------

def sse(body: BaseModel | dict) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    text = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class CompletionChunks:
    """The events of a streamed completion: text deltas per choice, then usage."""

    def __init__(self, response_id: str, model: str) -> None:
        self.response_id, self.model, self.created = response_id, model, int(time.time())

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(CompletionResponse(id=self.response_id, created=self.created,
                                      model=self.model, choices=choices, usage=usage))

    def start(self, num_choices: int) -> list[str]:
        return []

    def delta(self, index: int, text: str, finish_reason: str | None,
              logprobs: CompletionLogprobs | None = None) -> str:
        return self._chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                             finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)


class ChatChunks(CompletionChunks):
    """The events of a streamed chat completion: the assistant role first for every choice
    (as OpenAI sends it), then content deltas, then usage."""

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=self.response_id, created=self.created,
                                       model=self.model, choices=choices, usage=usage))

    def start(self, num_choices: int) -> list[str]:
        return [self._chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                             for i in range(num_choices)])]

    def delta(self, index: int, text: str, finish_reason: str | None,
              logprobs: ChatLogprobs | None = None) -> str:
        return self._chunk([ChatChunkChoice(index=index, delta=Delta(content=text or None),
                                            logprobs=logprobs, finish_reason=finish_reason)])
