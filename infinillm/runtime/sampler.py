"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

All greedy batches (the common benchmark case) take one argmax over the batch; other rows are
sampled one by one (small batches on CPU). A seeded request's generator is re-seeded from
(seed, index of the token being sampled), which makes its output independent of what else runs
in the batch and of preemption.
"""

from __future__ import annotations

import torch

from infinillm.types import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams],
           num_output_tokens: list[int]) -> list[int]:
    """logits [S, V] float32 -> one token id per row."""
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1).tolist()
    return [
        _sample_row(logits[i], p, n) for i, (p, n) in enumerate(zip(params, num_output_tokens))
    ]


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
