"""Per-request output state: incremental detokenization, the stop conditions, logprobs.

A request finishes when it samples an EOS token (unless `ignore_eos`) or one of its
`stop_token_ids`, when its text contains a stop string (the text is cut before it; not before
`min_tokens` tokens exist, as in vLLM), when it has `max_tokens` tokens, or when it reaches the
model's context length. A request with a JSON schema also finishes ("stop") when its
grammar is complete, whatever `min_tokens` says (nothing but EOS could follow). (The sampler
keeps EOS and stop ids from being sampled before `min_tokens`, and tokens outside the grammar
from being sampled at all.)

Logprobs are kept on the Request, so that they survive a preemption: an output carries those
of its tokens so far and, once the prompt is computed, those of the prompt (the same list on
every output, built once).
"""

from __future__ import annotations

from infinillm.engine.grammar import RequestGrammar
from infinillm.model.tokenizer import IncrementalDetokenizer, Tokenizer
from infinillm.types import (
    CompletionOutput,
    FinishReason,
    Request,
    RequestOutput,
    TokenLogprobs,
)


class OutputStream:
    def __init__(self, request: Request, tokenizer: Tokenizer | None, max_model_len: int,
                 eos_token_ids: set[int], grammar: RequestGrammar | None = None) -> None:
        self.request = request
        self.grammar = grammar  # advanced by every sampled token but EOS
        self.detokenizer = (IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
                            if tokenizer is not None else _NoText())
        self.eos_ids = set() if request.params.ignore_eos else set(eos_token_ids)
        self.stop_ids = set(request.params.stop_token_ids or ())
        self.max_model_len = max_model_len
        self.text = ""
        # While running, this many trailing characters may still turn into a stop string.
        self._hold = max((len(s) for s in request.params.stop or ()), default=1) - 1
        self._prompt_logprobs: list[TokenLogprobs | None] | None = None  # built once

    def add_prompt_logprobs(self, logprobs: list[TokenLogprobs] | None) -> None:
        """Record the prompt logprobs a step computed (the next ones in position order)."""
        if logprobs:
            self.request.prompt_logprobs.extend(logprobs)

    def append(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record one sampled token (and its logprobs) and decide whether the request is done."""
        r = self.request
        r.output_token_ids.append(token_id)
        if logprobs is not None:
            r.output_logprobs.append(logprobs)
        if token_id in self.eos_ids or token_id in self.stop_ids:
            r.finish_reason = FinishReason.STOP
            self.text += self.detokenizer.flush()
            return
        before = len(self.text)
        self.text += self.detokenizer.add(token_id)
        complete = self.grammar is not None and self.grammar.accept(token_id)
        may_stop = len(r.output_token_ids) >= r.params.min_tokens
        if r.params.stop and may_stop and self._cut_at_stop(before):
            r.finish_reason = FinishReason.STOP
        elif complete:
            r.finish_reason = FinishReason.STOP
            self.text += self.detokenizer.flush()
        elif len(r.output_token_ids) >= r.params.max_tokens or r.num_tokens >= self.max_model_len:
            r.finish_reason = FinishReason.LENGTH
            self.text += self.detokenizer.flush()

    def _cut_at_stop(self, before: int) -> bool:
        start = max(0, before - self._hold)
        hits = [(i, s) for s in self.request.params.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        keep = index + len(stop) if self.request.params.include_stop_str_in_output else index
        self.text = self.text[:keep]
        return True

    def output(self) -> RequestOutput:
        r = self.request
        finished = r.finish_reason is not None
        text = self.text if finished or not self._hold else self.text[: -self._hold]
        reason = r.finish_reason.value if finished else None
        logprobs = None if r.params.logprobs is None else list(r.output_logprobs)
        return RequestOutput(
            request_id=r.request_id,
            prompt=r.prompt,
            prompt_token_ids=r.prompt_token_ids,
            outputs=[CompletionOutput(0, text, list(r.output_token_ids), reason, logprobs)],
            finished=finished,
            prompt_logprobs=self._prompt_logprobs_out(),
        )

    def _prompt_logprobs_out(self) -> list[TokenLogprobs | None] | None:
        r = self.request
        if r.params.prompt_logprobs is None:
            return None
        if self._prompt_logprobs is None and len(r.prompt_logprobs) == len(r.prompt_token_ids) - 1:
            self._prompt_logprobs = [None, *r.prompt_logprobs]
        return self._prompt_logprobs


class _NoText:
    """Stands in for the detokenizer of a model served without a tokenizer."""

    def add(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""
