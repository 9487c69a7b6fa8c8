"""Sampling: greedy, temperature, top-k, top-p and seeds, against the distributions they define."""

from __future__ import annotations

import torch

from infinillm.runtime import sample
from infinillm.types import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draw(params: SamplingParams, n: int) -> torch.Tensor:
    counts = torch.zeros(len(LOGITS))
    for i in range(n):
        counts[sample(LOGITS[None], [params], [i])[0]] += 1
    return counts / n


def test_greedy_is_argmax_for_a_batch():
    logits = torch.randn(5, 100)
    greedy = [SamplingParams(temperature=0)] * 5
    assert sample(logits, greedy, [0] * 5) == logits.argmax(-1).tolist()


def test_temperature_follows_softmax():
    torch.manual_seed(0)
    freq = draw(SamplingParams(temperature=0.7), 4000)
    expected = torch.softmax(LOGITS / 0.7, -1)
    assert (freq - expected).abs().max() < 0.03


def test_top_k_and_top_p_restrict_support():
    torch.manual_seed(1)
    freq = draw(SamplingParams(temperature=1.0, top_k=2), 2000)
    assert freq[2:].sum() == 0
    expected = torch.softmax(LOGITS[:2], -1)
    assert (freq[:2] - expected).abs().max() < 0.04
    # softmax(LOGITS) = [.56, .21, .13, ...]: top_p 0.7 keeps the first two tokens only
    freq = draw(SamplingParams(temperature=1.0, top_p=0.7), 2000)
    assert freq[2:].sum() == 0 and freq[1] > 0.15
    assert draw(SamplingParams(temperature=1.0, top_p=0.01), 50)[0] == 1.0


def test_seed_makes_samples_reproducible_and_batch_independent():
    logits = torch.randn(3, 1000)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample(logits[1:2], [p], [k])[0] for k in range(20)]
    batched = [sample(logits, [SamplingParams(temperature=1.0)] + [p] * 2, [0, k, 0])[1]
               for k in range(20)]
    assert alone == batched
    assert len(set(alone)) > 1  # it does sample, not argmax


def test_a_top_p_below_float32_range_keeps_the_most_likely_token():
    # 1e-200 is a valid top_p (in (0, 1]) that rounds to 0 in float32: it must keep the top
    # token, not drop every token and fail the whole batch
    for top_p in (1e-200, 5e-324, 1e-45):
        params = SamplingParams(temperature=1.0, top_p=top_p, seed=3)
        assert sample(LOGITS[None], [params], [0]) == [int(LOGITS.argmax())]
