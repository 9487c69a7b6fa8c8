"""How a choice's cumulative engine output becomes the text and logprobs of a response.

One `Shape` per endpoint gives, for choice i, its whole text so far and its logprob entries so
far; a streamed response sends what is new since the last event, a plain one all of it.

- Chat: `choices[].logprobs.content[]` holds, per generated token, its text, logprob, UTF-8
  bytes and `top_logprobs` (the n most likely tokens, each with text, logprob and bytes).
- Completions: `choices[].logprobs` holds parallel lists `tokens`, `token_logprobs`,
  `top_logprobs` (text -> logprob of the n most likely tokens and of the token itself, as
  OpenAI's legacy API: up to n + 1) and `text_offset`. With `echo`, the prompt's tokens come
  first, the first one with a null logprob and null top_logprobs (nothing precedes it); with
  `max_tokens: 0` only the prompt is returned (the one token the engine generated is dropped).

Logprobs are those of the engine: log-softmax of the model's raw logits (before temperature
and penalties). A token's text is its bytes decoded as UTF-8, U+FFFD standing for a piece of a
multi-byte character (its `bytes` stay exact); `text_offset` counts the characters of the
token texts before each token, as vLLM does. Without a tokenizer a token's text is
`token_id:N` (vLLM's spelling).
"""

from __future__ import annotations

from infinillm.model.tokenizer import Tokenizer
from infinillm.server import protocol as P
from infinillm.types import RequestOutput, TokenLogprobs

# (token id, logprob or None, top (token id, logprob) pairs or None)
Entry = tuple[int, float | None, list[tuple[int, float]] | None]


class TokenTexts:
    """Token id -> (text, UTF-8 bytes), cached (at most one entry per vocabulary id)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
                found = (text, list(text.encode()))
            else:
                raw = self.tokenizer.token_bytes(token_id)
                found = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = found
        return found


class Shape:
    """An endpoint's view of a choice: its text and logprob entries so far, and how a run of
    entries is written. `offset` is the running character offset of completions' text_offset."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts

    def text(self, i: int, out: RequestOutput) -> str:
        return out.outputs[0].text

    def entries(self, i: int, out: RequestOutput) -> list[Entry] | None:
        logprobs = out.outputs[0].logprobs
        return None if logprobs is None else _entries(logprobs)

    def finish_reason(self, out: RequestOutput) -> str | None:
        return out.outputs[0].finish_reason

    def num_generated(self, out: RequestOutput | None) -> int:
        return 0 if out is None else len(out.outputs[0].token_ids)

    def logprobs(self, entries: list[Entry], offset: int):
        """The response's logprobs object for `entries` and the offset after them."""
        raise NotImplementedError


class ChatShape(Shape):
    def logprobs(self, entries: list[Entry], offset: int) -> tuple[P.ChatLogprobs, int]:
        content = []
        for token_id, logprob, top in entries:
            text, raw = self.texts(token_id)
            alternatives = []
            for alt_id, alt_logprob in top or ():
                alt_text, alt_raw = self.texts(alt_id)
                alternatives.append(P.TopLogprob(token=alt_text, logprob=alt_logprob,
                                                 bytes=alt_raw))
            content.append(P.TokenLogprob(token=text, logprob=logprob, bytes=raw,
                                          top_logprobs=alternatives))
        return P.ChatLogprobs(content=content), offset


class CompletionShape(Shape):
    """Completions: `echoes[i]` is choice i's prompt text when the request echoes."""

    def __init__(self, texts: TokenTexts, echoes: list[str] | None, echo_only: bool) -> None:
        super().__init__(texts)
        self.echoes = echoes
        self.echo_only = echo_only

    def text(self, i: int, out: RequestOutput) -> str:
        echo = self.echoes[i] if self.echoes is not None else ""
        return echo if self.echo_only else echo + out.outputs[0].text

    def entries(self, i: int, out: RequestOutput) -> list[Entry] | None:
        generated = out.outputs[0].logprobs
        if generated is None:
            return None
        entries: list[Entry] = []
        if self.echoes is not None and out.prompt_logprobs is not None:
            entries.append((out.prompt_token_ids[0], None, None))
            entries += _entries(out.prompt_logprobs[1:])
        if not self.echo_only:
            entries += _entries(generated)
        return entries

    def finish_reason(self, out: RequestOutput) -> str | None:
        reason = out.outputs[0].finish_reason
        return "length" if self.echo_only and reason is not None else reason

    def num_generated(self, out: RequestOutput | None) -> int:
        return 0 if self.echo_only else super().num_generated(out)

    def logprobs(self, entries: list[Entry], offset: int) -> tuple[P.CompletionLogprobs, int]:
        tokens, logprobs, tops, offsets = [], [], [], []
        for token_id, logprob, top in entries:
            text = self.texts(token_id)[0]
            tokens.append(text)
            logprobs.append(logprob)
            if top is None:
                tops.append(None)
            else:
                alternatives = {self.texts(t)[0]: lp for t, lp in top}
                alternatives.setdefault(text, logprob)
                tops.append(alternatives)
            offsets.append(offset)
            offset += len(text)
        return P.CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops,
                                    text_offset=offsets), offset


def _entries(logprobs: list[TokenLogprobs]) -> list[Entry]:
    return [(e.token_id, e.logprob, e.top) for e in logprobs]
