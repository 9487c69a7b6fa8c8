"""The sampler's structured-output mask: bit unpacking against a bit-by-bit reference of
llguidance's layout (the CPU path and the tensor path of other devices), masked rows sample
only allowed tokens (greedy and seeded, with logit controls on top), unmasked rows of the same
batch give what they give with no mask anywhere, and the logits are not changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infinillm.runtime.sampler import banned_by_shifts, banned_tokens, sample
from infinillm.types import SamplingParams

V = 100  # 4 words of 32 bits cover 128 ids


def bitmask_of(allowed: set[int], num_words: int) -> np.ndarray:
    bits = np.zeros(num_words * 32, dtype=np.uint8)
    bits[sorted(allowed)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


@pytest.mark.parametrize("vocab_size", [70, 96, 128, 150])
def test_banned_tokens_match_a_per_bit_reference(vocab_size):
    rng = np.random.default_rng(0)
    words = rng.integers(-2**31, 2**31, size=(3, 3), dtype=np.int64).astype(np.int32)
    # token t is allowed iff bit t % 32 of word t // 32 is set: Python ints, bit by bit
    expected = [[bool((int(words[m, t // 32]) >> (t % 32)) & 1) if t < 96 else False
                 for t in range(vocab_size)] for m in range(3)]
    got = ~banned_tokens(words, vocab_size, torch.device("cpu"))
    assert got.tolist() == expected
    # the path of other devices (tensor shifts), run here on CPU tensors
    shifted = ~banned_by_shifts(torch.from_numpy(words))
    width = min(vocab_size, 96)
    assert shifted[:, :width].tolist() == [row[:width] for row in expected]


def batch_params() -> list[SamplingParams]:
    return [SamplingParams(temperature=0),
            SamplingParams(temperature=1.0, seed=3),
            SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=4),
            SamplingParams(temperature=0, logit_bias={7: 100.0}, repetition_penalty=1e-30),
            SamplingParams(temperature=1.0, seed=5, presence_penalty=2.0)]


@pytest.mark.parametrize("greedy_only", [True, False])
def test_masked_rows_sample_allowed_tokens_and_others_are_untouched(greedy_only):
    gen = torch.Generator().manual_seed(1)
    params = batch_params()
    if greedy_only:
        params = [p for p in params if p.greedy]
    logits = torch.randn(len(params), V, generator=gen) * 5
    before = logits.clone()
    output_ids = [[7, 8, 9]] * len(params)
    allowed = [{7, 50}, {3, 99}, {1, 2, 64}, {8, 96}, {40}][: len(params)]
    masked = [0, 2, 3] if not greedy_only else [0]
    for trial in range(20):  # seeded rows draw per (seed, index): vary the index
        n = [trial] * len(params)
        bitmasks = [bitmask_of(allowed[i], 4) if i in masked else None
                    for i in range(len(params))]
        tokens = sample(logits, params, n, output_ids=output_ids, token_bitmasks=bitmasks)
        free = sample(logits, params, n, output_ids=output_ids)
        for i, t in enumerate(tokens):
            if i in masked:
                assert t in allowed[i], (i, t)
            else:
                assert t == free[i]
    assert torch.equal(logits, before)


def test_a_greedy_masked_row_takes_the_best_allowed_token():
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0, 4.0]])
    tokens = sample(logits, [SamplingParams(temperature=0)], [0],
                    token_bitmasks=[bitmask_of({2, 3}, 1)])
    assert tokens == [3]
