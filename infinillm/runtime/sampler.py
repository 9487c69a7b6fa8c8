"""Token sampling: logit controls, greedy, temperature, top-k, top-p, per-request seeds; logprobs.

All greedy batches (the common benchmark case) take one argmax over the batch; other rows are
sampled one by one (small batches on CPU). A seeded request's generator is re-seeded from
(seed, index of the token being sampled), which makes its output independent of what else runs
in the batch and of preemption.

Logit controls (min_tokens, logit_bias, repetition / frequency / presence penalties; semantics
in SamplingParams) change a copy of the rows of the requests that set them, before the
temperature; a batch where no request sets one does no work for them. Logprobs are the
log-softmax of the raw logits (`token_logprobs`), whatever the controls did.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from infinillm.types import SamplingParams, TokenLogprobs

LOGIT_BOUND = 1e30  # |logit| after the controls; / 1e-5 stays below float32's 3.4e38


def sample(logits: torch.Tensor, params: list[SamplingParams], num_output_tokens: list[int],
           prompt_ids: Sequence[list[int] | None] | None = None,
           output_ids: Sequence[list[int] | None] | None = None,
           eos_token_ids: Collection[int] = ()) -> list[int]:
    """logits [S, V] float32 -> one token id per row. `prompt_ids` / `output_ids` (per row, the
    request's prompt and output so far) are read only by rows whose penalties need them;
    `eos_token_ids` are the ids `min_tokens` bans (besides `stop_token_ids`). `logits` is not
    changed."""
    if any(p.adjusts_logits for p in params):
        none = [None] * len(params)
        logits = adjust_logits(logits, params, num_output_tokens, prompt_ids or none,
                               output_ids or none, eos_token_ids)
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1).tolist()
    return [
        _sample_row(logits[i], p, n) for i, (p, n) in enumerate(zip(params, num_output_tokens))
    ]


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams],
                  num_output_tokens: list[int], prompt_ids: Sequence[list[int] | None],
                  output_ids: Sequence[list[int] | None],
                  eos_token_ids: Collection[int]) -> torch.Tensor:
    """logits [S, V] float32 -> a copy with each row's logit controls applied, in vLLM's order:
    min_tokens, logit_bias, repetition, frequency and presence penalties."""
    out = logits.clone()
    for i, p in enumerate(params):
        if p.adjusts_logits:
            _adjust_row(out[i], p, num_output_tokens[i], prompt_ids[i] or [],
                        output_ids[i] or [], eos_token_ids)
    return out


def _adjust_row(row: torch.Tensor, p: SamplingParams, num_output: int, prompt: list[int],
                output: list[int], eos_token_ids: Collection[int]) -> None:
    """Apply `p`'s controls to one row [V] float32 in place. min_tokens' ban comes last here:
    -inf stays -inf through bias and penalties, so the result is that of vLLM's order."""
    device = row.device
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=device)
        row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype,
                                            device=device))
    if p.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(prompt + output, device=device).unique()
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty,
                                values * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and output:
        ids, counts = torch.tensor(output, device=device).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
    # A tiny repetition_penalty can push a logit to +inf, and a softmax over +inf is NaN: keep
    # every value finite, with room for the smallest temperature (1e-5) to divide it.
    row.clamp_(-LOGIT_BOUND, LOGIT_BOUND)
    if num_output < p.min_tokens:
        banned = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(eos_token_ids))
        banned = [t for t in banned if t < row.shape[0]]
        if banned:
            row[torch.tensor(banned, device=device)] = float("-inf")


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
        generator = torch.Generator().manual_seed(hash((p.seed, index)) & 0x7FFF_FFFF_FFFF_FFFF)
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
