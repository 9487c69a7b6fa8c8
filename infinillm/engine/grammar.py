"""Structured output: JSON schemas compiled into token-level grammars, one matcher per request.

The grammar library is llguidance (microsoft/llguidance, also a backend of vLLM, SGLang and
llama.cpp): from the tokenizer's vocabulary and a grammar it computes, at each step, the set of
tokens that keep the output a prefix of a sentence of the grammar, as a bitmask (bit t % 32 of
int32 word t // 32 is token t).

Contract:
- `check(params)` compiles a request's `json_schema` (once per distinct schema text: compiled
  grammars are cached, least recently used dropped beyond `MAX_CACHED_GRAMMARS`) or raises
  ValueError with llguidance's message; thread-safe, so that servers call it while preparing.
- `admit(request)` gives a constrained request its matcher (a copy of the compiled one: ~10 us);
  `free(request_id)` drops it when the request finishes or is aborted.
- `fill_bitmasks(plans)` sets `token_bitmask` on the sampling chunk of every constrained request
  of the step (on the host, before the step runs; nothing at all when no request is
  constrained); the sampler applies it to those rows only (runtime/sampler.py).
- `RequestGrammar.accept(token)` advances a matcher by a sampled token and says whether the
  grammar is complete (only EOS may follow): the request then finishes with "stop". The matcher
  lives in the engine with the request, so a preemption (recompute) changes nothing: the output
  tokens it consumed are kept, and the next sampled token follows them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING

import numpy as np

from infinillm.model.tokenizer import Tokenizer
from infinillm.types import Request, RequestId, SamplingParams, StepPlan

if TYPE_CHECKING:
    import llguidance

logger = logging.getLogger("infinillm")

MAX_CACHED_GRAMMARS = 256
# JSON as compact as OpenAI writes it: no whitespace between tokens (a grammar that allows any
# amount of it lets a model pad its output with blanks until max_tokens).
JSON_OPTIONS = {"whitespace_flexible": False}


class RequestGrammar:
    """One constrained request's matcher and the bitmask row it fills."""

    __slots__ = ("request_id", "matcher")

    def __init__(self, request_id: RequestId, matcher: llguidance.LLMatcher) -> None:
        self.request_id = request_id
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; True when the grammar is complete (nothing but EOS may
        follow), or when the token was not allowed. The sampler applies the mask, so that can
        only happen when every allowed token was banned too (`min_tokens` bans the request's
        `stop_token_ids`): the request then ends (logged), rather than the engine."""
        if self.matcher.consume_token(token_id):
            return self.matcher.is_stopped()
        logger.warning("request %s sampled token %d, which its grammar does not allow (%s); "
                       "ending it", self.request_id, token_id, self.matcher.get_error())
        return True


class StructuredOutput:
    """The compiled grammars of one engine and the matchers of its constrained requests."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int,
                 eos_token_ids: Collection[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (logits' width); may exceed the tokenizer's
        self.eos_token_ids = sorted(eos_token_ids)
        self.matchers: dict[RequestId, RequestGrammar] = {}
        self._lock = threading.Lock()  # `check` runs on servers' threads, the rest on the loop
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None

    @property
    def num_words(self) -> int:
        """int32 words of one bitmask row."""
        return (self._llg_tokenizer().vocab_size + 31) // 32

    def check(self, params: SamplingParams) -> None:
        """ValueError (naming json_schema, with llguidance's reason) if the schema of a
        constrained request does not compile; compiles and caches it otherwise."""
        if params.json_schema is not None:
            self._compile(params.json_schema)

    def admit(self, request: Request) -> RequestGrammar | None:
        """The matcher of a new request; None when it is not constrained."""
        schema = request.params.json_schema
        if schema is None:
            return None
        grammar = RequestGrammar(request.request_id, self._compile(schema).deep_copy())
        self.matchers[request.request_id] = grammar
        return grammar

    def free(self, request_id: RequestId) -> None:
        self.matchers.pop(request_id, None)

    def fill_bitmasks(self, plans: Iterable[StepPlan]) -> None:
        """Set the bitmask of every constrained sampling chunk of the step: one [R, W] int32
        array for the R constrained requests, filled by llguidance's thread pool (it drops the
        GIL), each chunk a row of it."""
        if not self.matchers:
            return
        chunks, pairs = [], []
        for plan in plans:
            for chunk in plan.chunks:
                grammar = self.matchers.get(chunk.request_id) if chunk.sample else None
                if grammar is not None:
                    pairs.append((grammar.matcher, len(chunks)))
                    chunks.append(chunk)
        if not chunks:
            return
        import llguidance.numpy as llg_numpy

        bitmask = np.empty((len(chunks), self.num_words), dtype=np.int32)
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        llg_numpy.fill_next_token_bitmask_par(self._executor, pairs, bitmask)
        for chunk, row in zip(chunks, bitmask):
            chunk.token_bitmask = row

    def _compile(self, schema: str) -> llguidance.LLMatcher:
        import llguidance

        with self._lock:
            compiled = self._compiled.get(schema)
            if compiled is not None:
                self._compiled.move_to_end(schema)
                return compiled
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as e:  # not JSON, or not an object
            raise ValueError(f"json_schema is not a JSON schema: {e}") from None
        tokenizer = self._llg_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise ValueError(f"json_schema does not compile: {error}")
        compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise ValueError(f"json_schema does not compile: {compiled.get_error()}")
        with self._lock:
            self._compiled[schema] = compiled
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built on first use (~1 s for 49k tokens):
        the model's width (ids the tokenizer lacks are never allowed) and our EOS ids."""
        with self._lock:
            if self._ll_tokenizer is None:
                if self.tokenizer is None:
                    raise ValueError("json_schema needs the model's tokenizer (tokenizer.json), "
                                     "which this model has not")
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(),
                    n_vocab=max(self.vocab_size, self.tokenizer.vocab_size),
                    eos_token=self.eos_token_ids or None)
            return self._ll_tokenizer
