"""bench.lib.workloads: seeded, documented distributions, one make_workload for every kind."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from bench.lib.workloads import (
    MIN_REGULAR_TOKEN_ID,
    load_prompts,
    make_workload,
    prompt_lens,
    seeded_prompts,
)

VOCAB = 512
POOL = dict(pool_tokens=200, num_long=3, short_len=(10, 20))


def _key(workload):
    return [(a.at_s, a.prompt_ids, a.max_new) for a in workload]


@pytest.mark.parametrize("kind", ["short", "mixed", "long"])
def test_online_workload_is_seeded_and_rate_only_scales_arrivals(kind):
    slow = make_workload(kind, 12, VOCAB, seed=3, new_tokens=(4, 8), rate=1.0)
    fast = make_workload(kind, 12, VOCAB, seed=3, new_tokens=(4, 8), rate=4.0)
    assert [a.prompt_ids for a in slow] == [a.prompt_ids for a in fast]
    assert [a.max_new for a in slow] == [a.max_new for a in fast]
    assert [a.at_s for a in slow] == pytest.approx([4 * a.at_s for a in fast])
    assert _key(slow) == _key(make_workload(kind, 12, VOCAB, seed=3, new_tokens=(4, 8), rate=1.0))
    assert _key(slow) != _key(make_workload(kind, 12, VOCAB, seed=4, new_tokens=(4, 8), rate=1.0))
    assert all(4 <= a.max_new <= 8 for a in slow)
    assert 0 < slow[0].at_s and all(b.at_s > a.at_s for a, b in zip(slow, slow[1:]))


def test_without_a_rate_every_request_arrives_at_once_with_the_same_prompts():
    online = make_workload("mixed", 12, VOCAB, seed=1, new_tokens=(4, 8), rate=2.0)
    offline = make_workload("mixed", 12, VOCAB, seed=1, new_tokens=(4, 8))
    assert [a.prompt_ids for a in online] == [a.prompt_ids for a in offline]
    assert {a.at_s for a in offline} == {0.0}


def test_poisson_gaps_average_one_over_the_rate():
    arrivals = make_workload("offline", 4000, VOCAB, seed=0, new_tokens=(1, 1), rate=4.0,
                             prompt_len=(1, 1))
    gaps = [b.at_s - a.at_s for a, b in zip(arrivals, arrivals[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.1)  # exponential: sd = mean


@pytest.mark.parametrize(("kind", "lo", "hi"), [("short", 100, 400), ("mixed", 100, 2400),
                                                ("long", 30, 3000)])
def test_online_prompt_lengths_follow_the_documented_distribution(kind, lo, hi):
    lens = prompt_lens(kind, 600, random.Random(0))
    assert lo <= min(lens) and max(lens) <= hi
    if kind == "mixed":
        assert sum(n >= 600 for n in lens) == 100  # one in six is long
    if kind == "long":  # log-uniform: a third of the lengths per factor of ~4.6
        assert 150 <= sum(n < 140 for n in lens) <= 250


def test_offline_kind_is_the_seeded_prompt_set():
    workload = make_workload("offline", 8, VOCAB, seed=5, new_tokens=(64, 64))
    assert [a.prompt_ids for a in workload] == seeded_prompts(VOCAB, 8, 32, 40, seed=5)
    assert all(a.max_new == 64 and a.at_s == 0.0 for a in workload)
    assert all(32 <= len(a.prompt_ids) <= 40 for a in workload)


def test_token_ids_avoid_special_tokens_and_stay_in_the_vocabulary():
    for kind, shape in [("short", {}), ("offline", {}), ("over", POOL | {"long_frac": (1, 2)}),
                        ("uniform", {"prompt_len": (5, 9)})]:
        rate = 1.0 if kind == "uniform" else None
        workload = make_workload(kind, 20, VOCAB, seed=0, new_tokens=(1, 2), rate=rate, **shape)
        ids = {t for a in workload for t in a.prompt_ids}
        assert MIN_REGULAR_TOKEN_ID <= min(ids) and max(ids) < VOCAB, kind


def test_over_and_fair_size_long_prompts_against_one_pool():
    over = make_workload("over", 23, VOCAB, seed=0, new_tokens=(5, 10), long_frac=(1.2, 1.5),
                         **POOL)
    fair = make_workload("fair", 23, VOCAB, seed=0, new_tokens=(5, 10), long_frac=(0.8, 1.2),
                         **POOL)
    long_over = [len(a.prompt_ids) for a in over if len(a.prompt_ids) > 20]
    assert len(long_over) == 3 and all(240 <= n <= 300 for n in long_over)
    assert sum(len(a.prompt_ids) > 20 for a in fair) == 3
    assert all(len(a.prompt_ids) + 10 <= 200 for a in fair)  # fits one pool with its tokens
    assert all(10 <= len(a.prompt_ids) <= 20 for a in over if len(a.prompt_ids) <= 20)


def test_uniform_kind_starts_at_zero_and_draws_new_prompts_per_rate():
    one = make_workload("uniform", 10, VOCAB, seed=0, rate=1.0, prompt_len=(5, 9),
                        new_tokens=(3, 4))
    two = make_workload("uniform", 10, VOCAB, seed=0, rate=2.0, prompt_len=(5, 9),
                        new_tokens=(3, 4))
    assert one[0].at_s == 0.0 and all(b.at_s >= a.at_s for a, b in zip(one, one[1:]))
    assert [a.prompt_ids for a in one] != [a.prompt_ids for a in two]
    assert all(5 <= len(a.prompt_ids) <= 9 and 3 <= a.max_new <= 4 for a in one)


def test_bad_arguments_raise_with_the_offending_value():
    with pytest.raises(ValueError, match="'huge'"):
        make_workload("huge", 3, VOCAB, seed=0, new_tokens=(1, 2))
    with pytest.raises(ValueError, match="-1"):
        make_workload("short", 3, VOCAB, seed=0, new_tokens=(1, 2), rate=-1)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        make_workload("short", 3, VOCAB, seed=0, new_tokens=(3, 2))
    with pytest.raises(ValueError, match="needs a rate"):
        make_workload("uniform", 3, VOCAB, seed=0, new_tokens=(1, 2), prompt_len=(1, 2))
    with pytest.raises(TypeError, match="prompt_len"):
        make_workload("short", 3, VOCAB, seed=0, new_tokens=(1, 2), prompt_len=(1, 2))
    with pytest.raises(ValueError, match="100"):
        seeded_prompts(50, 1)


def test_prompt_files_round_trip_and_reject_other_json(tmp_path):
    good, bad = tmp_path / "p.json", tmp_path / "bad.json"
    prompts = seeded_prompts(VOCAB, 3, seed=2)
    good.write_text(json.dumps(prompts))
    bad.write_text(json.dumps([[1, 2], []]))
    assert load_prompts(str(good)) == prompts
    with pytest.raises(ValueError, match="token ids"):
        load_prompts(str(bad))
