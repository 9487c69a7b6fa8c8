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


# ---- logit controls and logprobs ------------------------------------------------------------

def controls_reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int],
                       output: list[int], eos: set[int]) -> torch.Tensor:
    """One row's controls by hand in float64, in vLLM's order (min_tokens, logit_bias,
    repetition, frequency, presence), token by token."""
    row = logits.double().clone()
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else eos):
            row[t] = float("-inf")
    for t, bias in (p.logit_bias or {}).items():
        row[t] += bias
    for t in set(prompt) | set(output):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return row


def test_logit_controls_match_a_float64_reference():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 50, generator=gen) * 3
    prompt = [1, 2, 3, 3, 40]
    output = [3, 7, 7, 7, 9, 2]
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.7),
        SamplingParams(temperature=0, frequency_penalty=0.9, presence_penalty=-1.5),
        SamplingParams(temperature=0),  # no control: its row stays as it is
        SamplingParams(temperature=0, min_tokens=8, stop_token_ids=[11], logit_bias={5: 7.5,
                       9: -100}, repetition_penalty=0.6, frequency_penalty=2, presence_penalty=1),
    ]
    from infinillm.runtime.sampler import adjust_logits

    before = logits.clone()
    rows, got = adjust_logits(logits, params, [len(output)] * 4, [prompt] * 4, [output] * 4,
                              {0})
    assert rows == [0, 1, 3]  # row 2 sets no control
    for row, i in zip(got, rows):
        ref = controls_reference(logits[i], params[i], prompt, output, {0})
        assert torch.equal(torch.isinf(row), torch.isinf(ref))
        finite = ~torch.isinf(ref)
        assert (row[finite].double() - ref[finite]).abs().max() < 1e-5
    assert torch.isinf(got[2, [0, 11]]).all()
    assert torch.equal(logits, before)  # the caller's logits (raw, for logprobs) are kept


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    assert sample(logits, [p], [0], eos_token_ids={0}) == [2]
    assert sample(logits, [p], [1], eos_token_ids={0}) == [2]
    assert sample(logits, [p], [2], eos_token_ids={0}) == [0]
    ignoring = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert sample(logits, [ignoring], [0], eos_token_ids={0}) == [0]


def test_no_control_in_the_batch_means_no_work(monkeypatch):
    from infinillm.runtime import sampler

    def fail(*args):
        raise AssertionError("adjust_logits ran for a batch without controls")

    monkeypatch.setattr(sampler, "adjust_logits", fail)
    logits = torch.randn(3, 10)
    plain = [SamplingParams(temperature=0), SamplingParams(temperature=0.5, seed=1),
             SamplingParams(temperature=0, repetition_penalty=1.0, logit_bias={})]
    assert len(sample(logits, plain, [0, 0, 0])) == 3


def test_seeded_sampling_with_penalties_is_batch_independent():
    logits = torch.randn(3, 1000)
    p = SamplingParams(temperature=1.0, seed=99, presence_penalty=1.0, repetition_penalty=1.2)
    history = [list(range(0, 900, 3))]
    alone = [sample(logits[1:2], [p], [k], history, history)[0] for k in range(10)]
    batched = [sample(logits, [SamplingParams(temperature=0.3)] + [p] * 2, [0, k, 0],
                      [None] + history * 2, [None] + history * 2)[1] for k in range(10)]
    assert alone == batched and len(set(alone)) > 1


def test_token_logprobs_match_float64_log_softmax():
    from infinillm.runtime.sampler import token_logprobs

    logits = torch.randn(3, 300) * 4
    found = token_logprobs(logits, [5, 17, 299], [0, 3, 300])
    ref = torch.log_softmax(logits.double(), -1)
    for row, (entry, token, n) in enumerate(zip(found, [5, 17, 299], [0, 3, 300])):
        assert entry.token_id == token and abs(entry.logprob - ref[row, token]) < 1e-5
        values, indices = ref[row].topk(n)
        assert [t for t, _ in entry.top] == indices.tolist()
        assert all(abs(lp - v) < 1e-5 for (_, lp), v in zip(entry.top, values.tolist()))


def test_extreme_penalties_keep_sampling_defined():
    # a repetition_penalty of 1e-300 divides positive logits to +inf: the softmax must not
    # turn into NaN (which would fail the whole batch)
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    p = SamplingParams(temperature=1e-4, repetition_penalty=1e-300, seed=1)
    assert sample(logits, [p], [0], [[0, 1, 2]], [[]]) in ([0], [1])
    # and 1e300 sends positive logits to 0 and negative ones to -inf (bounded): 0 or 1 remain
    huge = SamplingParams(temperature=0.5, repetition_penalty=1e300, seed=1,
                          logit_bias={3: -100})
    assert sample(logits, [huge], [0], [[0, 1, 2, 3]], [[]]) in ([0], [1])
