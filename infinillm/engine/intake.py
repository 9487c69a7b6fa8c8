"""Intake: what happens to a new request before any scheduler sees it.

- **Validation** (`prepare`): token ids in the sampling parameters (logit_bias) are
  range-checked; the prompt is tokenized (or its token ids range-checked), and it
  must fit: shorter than the model's context with room for one generated token, and no more KV
  blocks than the cluster can give one request (its owner's pool plus what every other instance
  may lend). Bad input raises ValueError naming the value, and nothing is queued. `prepare`
  reads only fixed facts, so servers call it on their own thread.
- **Admission** (`admit`): a request id (given or numbered) and its arrival order.
- **Routing** (`route`): with prefix caching, the instance that caches the longest part of the
  prompt, among those that can start it now; else the instance with the most free blocks once
  its queue is served.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from infinillm.engine.builder import Instance
from infinillm.kvcache import blocks_needed
from infinillm.model.tokenizer import Tokenizer
from infinillm.types import Request, RequestId, SamplingParams


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A validated prompt, ready to be admitted."""

    text: str | None  # None for a prompt given as token ids
    token_ids: list[int]
    params: SamplingParams


class Intake:
    def __init__(self, tokenizer: Tokenizer | None, model_path: Path, vocab_size: int,
                 max_model_len: int, block_size: int, lending: bool,
                 max_blocks_per_request: Callable[[], int]) -> None:
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.lending = lending
        self.max_blocks_per_request = max_blocks_per_request  # shrinks if instances are lost
        self._ids = itertools.count()
        self._arrivals = itertools.count()

    def prepare(self, prompt: str | list[int],
                params: SamplingParams | None = None) -> PreparedPrompt:
        """Tokenize and check a prompt without queueing it."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        self._check_params(params)
        text, token_ids = self._tokenize(prompt)
        self._check_fits(token_ids)
        return PreparedPrompt(text, token_ids, params)

    def _check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids and counts against the vocabulary."""
        bad = [t for t in params.logit_bias or () if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size}), "
                             f"got {bad[:5]}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name} must be at most the vocabulary size "
                                 f"{self.vocab_size}, got {value}")

    def admit(self, prepared: PreparedPrompt, request_id: str | None,
              in_use: Callable[[RequestId], bool]) -> Request:
        """A new Request for a prepared prompt; ValueError if its id is `in_use`."""
        rid = RequestId(request_id if request_id is not None else str(next(self._ids)))
        if in_use(rid):
            raise ValueError(f"request id {rid!r} is already in use")
        return Request(rid, prepared.text, prepared.token_ids, prepared.params,
                       arrival=next(self._arrivals))

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError(f"model {str(self.model_path)!r} has no tokenizer.json; "
                                 "pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompt must be a non-empty string or token id list, got {prompt!r}")
        # The common case, plain ints in range, checked at C speed (a prompt may be long); any
        # doubt (bools, int subclasses, other types, out of range) takes the exact check.
        if set(map(type, prompt)) == {int} and 0 <= min(prompt) and max(prompt) < self.vocab_size:
            return None, list(prompt)
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size}), "
                             f"got {bad[:5]}")
        return None, list(prompt)

    def blocks_fit(self, num_tokens: int) -> bool:
        """Whether `num_tokens` and one generated token fit in the blocks the cluster can give
        one request (fewer once instances are lost)."""
        return blocks_needed(num_tokens + 1, self.block_size) <= self.max_blocks_per_request()

    def _check_fits(self, token_ids: list[int]) -> None:
        n = len(token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens; the model's context is {self.max_model_len} "
                             "tokens, including at least one generated token")
        if not self.blocks_fit(n):
            need = blocks_needed(n + 1, self.block_size)
            limit = self.max_blocks_per_request()
            where = "the cluster can give one request" if self.lending else "an instance holds"
            raise ValueError(f"prompt has {n} tokens and needs {need} KV blocks; {where} {limit}")


def route(instances: Sequence[Instance], request: Request | None = None) -> Instance:
    """The instance with the most free blocks once its queue is served; ties: the fewest
    unfinished requests, then the lowest id. Counting the queue matters: requests added between
    two steps would otherwise all go to the same instance. Free blocks are what limits a long
    request, and a lightly loaded instance also runs a smaller batch.

    A request with prefix keys (caching on) goes first to the instance that caches the most
    leading blocks of its prompt, when that instance has room for it: a free place in its batch
    and the blocks, once its queue is served. Elsewhere the prefix would still be read in place,
    but over the fabric."""
    def spare(i: Instance) -> int:
        return i.rmanager.num_free_blocks - i.scheduler.queued_blocks()

    if request is not None and request.block_keys:
        need = blocks_needed(request.num_tokens + 1, instances[0].rmanager.block_size)
        roomy = [i for i in instances if spare(i) >= need
                 and i.scheduler.num_unfinished < i.scheduler.config.max_num_seqs]
        hits = {i.instance_id: i.rmanager.num_cached_here(request.block_keys) for i in roomy}
        if any(hits.values()):
            return max(roomy, key=lambda i: (hits[i.instance_id], spare(i),
                                             -i.scheduler.num_unfinished, -i.instance_id))
    return max(instances, key=lambda i: (spare(i), -i.scheduler.num_unfinished,
                                         -i.instance_id))

