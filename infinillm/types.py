"""Ids, sampling parameters, requests and the typed records that cross layer boundaries.

Everything here is plain Python: the control plane (pools, tables, scheduler) passes these
around; only the runtime turns them into tensors.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NewType

if TYPE_CHECKING:
    import numpy

RequestId = NewType("RequestId", str)
BlockId = NewType("BlockId", int)
InstanceId = NewType("InstanceId", int)


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop; the names, defaults and semantics follow vLLM.

    temperature 0 (or below 1e-5) means greedy. top_k <= 0 disables top-k; top_p 1.0 disables top-p.

    Logit controls, applied in this order to the logits of every sampled token, before the
    temperature (as vLLM does): `min_tokens` (EOS and `stop_token_ids` cannot be sampled, and
    stop strings do not end the request, until that many tokens exist), `logit_bias` (token id
    -> value in [-100, 100] added to its logit), `repetition_penalty` (> 0; every token of the
    prompt or the output so far has a positive logit divided by it, a negative one multiplied),
    `frequency_penalty` and `presence_penalty` (in [-2, 2]; subtracted from the logit of each
    token of the output so far, once per occurrence and once, as OpenAI defines them).

    `logprobs` (n >= 0) returns, for every generated token, its log-probability and the n most
    likely tokens'; `prompt_logprobs` (n >= 0) the same for every prompt token but the first.
    Both are the log-softmax of the model's raw logits, before any control or temperature (vLLM's
    default "raw_logprobs").

    `json_schema` (structured output: the text of a JSON schema, or a dict that is written as
    one) constrains the output to a JSON value that validates against it: at every step only
    the tokens that keep the output a prefix of such a value can be sampled (after the logit
    controls, whatever the temperature or seed), EOS only once the value is complete, and the
    request finishes ("stop") when nothing but EOS may follow. `{"type": "object"}` asks for
    any JSON object (OpenAI's `json_object`). Plain data, so that it crosses process
    boundaries; the engine compiles it (engine/grammar.py).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    json_schema: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an int, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        bad_seed = isinstance(self.seed, bool) or not isinstance(self.seed, int)
        if self.seed is not None and bad_seed:
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        ids = self.stop_token_ids
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {ids!r}")
        self._check_controls()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")
        if isinstance(self.json_schema, dict):
            try:
                self.json_schema = json.dumps(self.json_schema)
            except (TypeError, ValueError) as e:  # a value JSON cannot hold
                raise ValueError(f"json_schema is not JSON: {e}") from None
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            raise ValueError(f"json_schema must be a JSON schema (str or dict) or None, got "
                             f"{self.json_schema!r}")

    def _check_controls(self) -> None:
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        rep = self.repetition_penalty
        if not _is_number(rep) or not 0.0 < rep < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rep!r}")
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got "
                             f"{self.logit_bias!r}")
        for token, bias in (self.logit_bias or {}).items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
            if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias of token {token} must be a number in [-100, 100], "
                                 f"got {bias!r}")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflow float32: treat it as greedy (as vLLM does).
        return self.temperature < 1e-5

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logit control is set (the sampler does no work for a row without)."""
        return bool(self.min_tokens or self.logit_bias or self.repetition_penalty != 1.0
                    or self.frequency_penalty or self.presence_penalty)

    @property
    def needs_prompt_ids(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def needs_output_ids(self) -> bool:
        return bool(self.repetition_penalty != 1.0 or self.frequency_penalty
                    or self.presence_penalty)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities at one position (log-softmax of the model's raw logits, float32):
    `token_id` is the token there (sampled, or the prompt's), `top` the `n` most likely tokens
    as (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request (vLLM's shape: `.text`, `.token_ids`)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when asked for


@dataclass(slots=True)
class RequestOutput:
    """What `LLM.generate` returns per prompt and what the engine streams per step."""

    request_id: RequestId
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # One per prompt token when asked for; None for the first (nothing precedes it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(slots=True)
class ScheduledChunk:
    """One request's share of a step on one instance.

    The worker feeds `token_ids`, which sit at positions [start_pos, start_pos + len(token_ids)),
    writes their K/V into the blocks of `blocks` (the request's block table in logical order:
    (holder instance, block) pairs, local or borrowed), attends over every position
    < start_pos + len(token_ids), wherever it lives, and samples a token after
    the last one when `sample` is set, with `params`. A seeded request draws from a generator
    seeded by (seed, num_output_tokens), so its samples do not depend on batching or preemption.
    The LM head runs on the sampled rows, plus the rows of `prompt_logprob_ids` where a request
    asked for prompt logprobs (no other request pays for them).

    `blocks` is the scheduler's block table itself, not a copy (copying every table every step
    cost O(blocks in the cluster)): a read-only view, valid for this step only. Nothing changes
    a table between `schedule()` and the end of the executor's `execute()` (block moves happen
    in the engine's rebalance, before `schedule()`); read it during the step, never change it,
    and copy it to keep it longer. `holders` counts the blocks of `blocks` on each holder
    instance (a copy, O(holders) to read: see runtime/traffic.py `tokens_by_holder`); the
    scheduler always fills it; when a chunk is built by hand without it, it is counted from
    `blocks`.
    """

    request_id: RequestId
    token_ids: list[int]
    start_pos: int
    blocks: list[tuple[InstanceId, BlockId]]
    sample: bool
    params: SamplingParams | None = None
    num_output_tokens: int = 0
    holders: dict[InstanceId, int] | None = None
    # The request's prompt and output so far, for the logit controls that read them (set only
    # on a sampling chunk whose params need them; views, like `blocks`).
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None
    # Prompt logprobs this chunk computes: those of the prompt tokens `prompt_logprob_ids`,
    # which follow positions prompt_logprob_pos, prompt_logprob_pos + 1, ... of the chunk.
    prompt_logprob_pos: int = 0
    prompt_logprob_ids: list[int] | None = None
    # The tokens a constrained request (params.json_schema) may sample, one bit per token id
    # (bit t % 32 of word t // 32): an int32 numpy array [ceil(V / 32)], set by the engine
    # before the step on sampling chunks only; a view, valid for this step (like `blocks`).
    token_bitmask: numpy.ndarray | None = None

    def __post_init__(self) -> None:
        if self.holders is None:
            self.holders = {}
            for holder, _ in self.blocks:
                self.holders[holder] = self.holders.get(holder, 0) + 1


@dataclass(slots=True)
class StepPlan:
    """Everything one instance's worker needs for one step; produced by its scheduler."""

    instance_id: InstanceId
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(slots=True)
class StepResult:
    """What an executor returns for one step (and a worker for its instance's share): the
    sampled token of every request that sampled, each instance's execute seconds (measured, or
    modelled by a simulator), and the logprobs asked for: of each sampled token, and of the
    prompt tokens each chunk computed (in position order)."""

    sampled: dict[RequestId, int]
    seconds: dict[InstanceId, float]
    logprobs: dict[RequestId, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[RequestId, list[TokenLogprobs]] = field(default_factory=dict)

    def add(self, other: StepResult) -> None:
        """Take in another instance's share of the step."""
        self.sampled.update(other.sampled)
        self.seconds.update(other.seconds)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)


@dataclass(frozen=True, slots=True)
class BlockMove:
    """Move logical block `index` of `request_id` (owned by `owner`) from `src` to `dst`, each an
    (instance, block) pair. The one move type from plan (cluster/) to data plane (runtime/).

    Moves are executed in two phases: the data plane copies every source to its destination
    (all reads before any write, so a set of moves may swap blocks), then the control plane
    switches the tables. No step runs in between, so a block is never read mid-move."""

    request_id: RequestId
    owner: InstanceId
    index: int
    src: tuple[InstanceId, BlockId]
    dst: tuple[InstanceId, BlockId]


@dataclass(frozen=True, slots=True)
class InstanceStep:
    """One instance's share of an engine step."""

    instance_id: InstanceId
    num_seqs: int  # requests with a chunk on this instance this step
    num_tokens: int  # tokens its worker ran: prefill, decode and recompute
    seconds: float  # its worker's execute time (measured; modelled by a simulated executor)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What one engine step did, read from `ClusterEngine.last_step` by benchmarks and metrics.

    Times come from the engine's clock (wall clock by default, virtual in a simulation)."""

    index: int
    start_s: float
    end_s: float
    instances: tuple[InstanceStep, ...]
    num_moves: int  # blocks moved between instances before the step (recall, migration)
    num_preempted: int  # requests preempted (to recompute) by this step's decisions
    num_finished: int  # requests that finished in this step

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.instances)

    def parallel_seconds(self) -> float:
        """The step's time had every instance its own device: the driver's share (everything
        but the workers) plus the slowest instance. A model, not a measurement, when the
        instances ran one after another in this process."""
        workers = [i.seconds for i in self.instances]
        return self.seconds - sum(workers) + max(workers, default=0.0)


@dataclass(slots=True, eq=False)
class Request:
    """A request as the engine tracks it. `num_computed_tokens` counts positions whose K/V are
    in the cache; preemption by recompute resets it to 0 and keeps the output so far."""

    request_id: RequestId
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    instance_id: InstanceId | None = None
    num_preemptions: int = 0
    # Logprobs as asked by `params`: of the output tokens so far, and of the prompt tokens
    # after the first, each computed once (a recompute after preemption skips those known).
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
