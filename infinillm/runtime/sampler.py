"""Token sampling: logit controls, greedy, temperature, top-k, top-p, per-request seeds; logprobs.

All greedy batches (the common benchmark case) take one argmax over the batch; other rows are
sampled one by one (small batches on CPU). A seeded request's generator is re-seeded from
(seed, index of the token being sampled), which makes its output independent of what else runs
in the batch and of preemption.

Logit controls (min_tokens, logit_bias, repetition / frequency / presence penalties; semantics
in SamplingParams) change a copy of the rows of the requests that set them, before the
temperature, touching only the tokens of their history; a batch where no request sets one does
no work for them. Structured output comes last: the rows of constrained requests (and only
those) get -inf on every token their grammar's bitmask does not allow (the engine computes the
bitmasks, engine/grammar.py), so greedy and seeded sampling both stay inside the grammar.
Logprobs are the log-softmax of the raw logits (`token_logprobs`), whatever the controls and
the grammar did.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch

from infinillm.types import SamplingParams, TokenLogprobs

LOGIT_BOUND = 1e30  # |logit| after the controls; / 1e-5 stays below float32's 3.4e38


def sample(logits: torch.Tensor, params: list[SamplingParams], num_output_tokens: list[int],
           prompt_ids: Sequence[list[int] | None] | None = None,
           output_ids: Sequence[list[int] | None] | None = None,
           eos_token_ids: Collection[int] = (),
           token_bitmasks: Sequence[np.ndarray | None] | None = None) -> list[int]:
    """logits [S, V] float32 -> one token id per row. `prompt_ids` / `output_ids` (per row, the
    request's prompt and output so far) are read only by rows whose penalties need them;
    `eos_token_ids` are the ids `min_tokens` bans (besides `stop_token_ids`);
    `token_bitmasks` (per row, None or the int32 bitmask [ceil(V' / 32)] of the tokens a
    constrained request may sample) mask those rows after the controls. `logits` is not
    changed."""
    rows: list[int] = []
    sub = None
    if any(p.adjusts_logits for p in params):
        none = [None] * len(params)
        rows, sub = adjust_logits(logits, params, num_output_tokens, prompt_ids or none,
                                  output_ids or none, eos_token_ids)
    masked = [i for i, m in enumerate(token_bitmasks or ()) if m is not None]
    if masked:
        rows, sub = _mask_rows(logits, rows, sub, masked, [token_bitmasks[i] for i in masked])
    if all(p.greedy for p in params):
        tokens = logits.argmax(dim=-1)
        if rows:
            tokens[rows] = sub.argmax(dim=-1)
        return tokens.tolist()
    adjusted = dict(zip(rows, sub)) if rows else {}
    return [_sample_row(adjusted.get(i, logits[i]), p, n)
            for i, (p, n) in enumerate(zip(params, num_output_tokens))]


def _mask_rows(logits: torch.Tensor, rows: list[int], sub: torch.Tensor | None, masked: list[int],
               bitmasks: list[np.ndarray]) -> tuple[list[int], torch.Tensor]:
    """Add the `masked` rows to the adjusted ones (`rows`, their logits `sub` [R, V]) and set
    every token their bitmask (int32 [W] each) does not allow to -inf: -> (rows, logits
    [R', V], a copy). Only these rows pay: one unpack of [M, W] words into [M, V] bits, one
    masked fill."""
    banned = banned_tokens(np.stack(bitmasks), logits.shape[1], logits.device)
    if not rows:  # the common case: no logit control in the batch
        return masked, logits[masked].masked_fill_(banned, float("-inf"))
    index = {row: k for k, row in enumerate(rows)}
    extra = [i for i in masked if i not in index]
    if extra:
        index.update((row, len(rows) + k) for k, row in enumerate(extra))
        rows = rows + extra
        sub = torch.cat([sub, logits[extra]])
    where = torch.tensor([index[i] for i in masked], dtype=torch.int64, device=sub.device)
    sub[where] = sub[where].masked_fill_(banned, float("-inf"))
    return rows, sub


def banned_tokens(words: np.ndarray, vocab_size: int, device: torch.device) -> torch.Tensor:
    """words [M, W] int32 (bit t % 32 of word t // 32 set: token t allowed; llguidance's
    layout) -> [M, vocab_size] bool on `device`, True where the token is not allowed (ids
    beyond 32 W are not). On the CPU numpy's unpackbits (one C pass over the inverted words,
    viewed as bool without a copy: ~10 us for 49k ids); elsewhere shifts on the device, so
    that only the words cross to it."""
    if device.type == "cpu":
        bits = np.unpackbits((~words).view(np.uint8), axis=1, bitorder="little")
        banned = torch.from_numpy(bits).view(torch.bool)
    else:
        banned = banned_by_shifts(torch.from_numpy(words).to(device))
    if banned.shape[1] >= vocab_size:
        return banned[:, :vocab_size]
    pad = banned.new_ones(words.shape[0], vocab_size - banned.shape[1])
    return torch.cat([banned, pad], dim=1)


def banned_by_shifts(words: torch.Tensor) -> torch.Tensor:
    """words [M, W] int32 -> [M, 32 W] bool (True: bit not set), with tensor ops on their
    device."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return (((words[:, :, None] >> shifts) & 1) == 0).view(words.shape[0], -1)


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams],
                  num_output_tokens: list[int], prompt_ids: Sequence[list[int] | None],
                  output_ids: Sequence[list[int] | None],
                  eos_token_ids: Collection[int]) -> tuple[list[int], torch.Tensor]:
    """logits [S, V] float32 -> (the R rows that set a control, their logits [R, V] float32
    with the controls applied, a copy), with vLLM's semantics and order: min_tokens, logit_bias,
    repetition, frequency and presence penalties.

    The rows are adjusted together and only where a token of their history (or bias, or ban)
    is: a few gathers and scatters over those (row, token) pairs, never an operation over the
    whole [R, V] (one such pass costs more than all the pairs of a long history). min_tokens'
    ban comes last: -inf stays -inf through bias and penalties, so the result is that of
    vLLM's order."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    chosen = [params[i] for i in rows]
    sub = logits[rows]  # a copy
    flat, vocab = sub.view(-1), sub.shape[1]
    bias = _flat([list(p.logit_bias or ()) for p in chosen], sub)
    if bias is not None:
        values = [v for p in chosen for v in (p.logit_bias or {}).values()]
        flat.index_add_(0, bias, torch.tensor(values, dtype=sub.dtype, device=sub.device))
    seen = _flat([(prompt_ids[i] or []) + (output_ids[i] or []) if p.repetition_penalty != 1.0
                  else [] for i, p in zip(rows, chosen)], sub)
    if seen is not None:
        seen = seen.unique()
        values = flat[seen]
        penalty = _per_row([p.repetition_penalty for p in chosen], sub)[seen // vocab]
        values = torch.where(values > 0, values / penalty, values * penalty)
        # A tiny penalty can push a logit to +inf, and a softmax over +inf is NaN: keep it
        # finite, with room for the smallest temperature (1e-5) to divide it.
        flat[seen] = values.clamp_(-LOGIT_BOUND, LOGIT_BOUND)
    generated = _flat([output_ids[i] or [] if p.frequency_penalty or p.presence_penalty
                       else [] for i, p in zip(rows, chosen)], sub)
    if generated is not None:
        where, counts = generated.unique(return_counts=True)
        row = where // vocab
        flat[where] -= (_per_row([p.frequency_penalty for p in chosen], sub)[row] * counts
                        + _per_row([p.presence_penalty for p in chosen], sub)[row])
    banned = _flat([_banned(p, eos_token_ids, vocab) if num_output_tokens[i] < p.min_tokens
                    else [] for i, p in zip(rows, chosen)], sub)
    if banned is not None:
        flat[banned] = float("-inf")
    return rows, sub


def _flat(ids_per_row: list[list[int]], sub: torch.Tensor) -> torch.Tensor | None:
    """Flat indices into `sub` [R, V] (row * V + token id) of every id of every row, int64;
    None when there are none."""
    if not any(ids_per_row):
        return None
    lengths = torch.tensor([len(ids) for ids in ids_per_row])
    starts = torch.repeat_interleave(torch.arange(len(ids_per_row)) * sub.shape[1], lengths)
    token_ids = torch.tensor([t for ids in ids_per_row for t in ids], dtype=torch.int64)
    return (starts + token_ids).to(sub.device)


def _per_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _banned(p: SamplingParams, eos_token_ids: Collection[int], vocab_size: int) -> list[int]:
    banned = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(eos_token_ids))
    return [t for t in banned if t < vocab_size]


def _sample_row(logits: torch.Tensor, p: SamplingParams, index: int) -> int:
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        drop = before >= p.top_p
        # The most likely token always stays: a top_p below float32's smallest positive value
        # (1e-200 is valid input) rounds to 0 and would otherwise drop every token.
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    generator = None
    if p.seed is not None:
        # The generator lives where probs do (multinomial needs that): a seed gives the same
        # tokens on the same device type, not across CPU and CUDA.
        generator = torch.Generator(probs.device)
        generator.manual_seed(hash((p.seed, index)) & 0x7FFF_FFFF_FFFF_FFFF)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token_ids: list[int],
                   num_top: list[int]) -> list[TokenLogprobs]:
    """logits [R, V] (raw, float32), one chosen token and a count of top tokens per row ->
    per row the chosen token's log-softmax and the `num_top` largest, most likely first.
    At most three host transfers, whatever R is."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(token_ids, dtype=torch.int64, device=logits.device)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    k = max(num_top, default=0)
    if not k:
        return [TokenLogprobs(t, lp, []) for t, lp in zip(token_ids, chosen)]
    values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    values, indices = values.tolist(), indices.tolist()
    return [TokenLogprobs(t, lp, list(zip(indices[r][:n], values[r][:n])))
            for r, (t, lp, n) in enumerate(zip(token_ids, chosen, num_top))]
