"""bench.lib.metrics: the one percentile definition (nearest rank) and `summarize`."""

from __future__ import annotations

import pytest

from bench.lib.metrics import RequestRecord, percentile, summarize


@pytest.mark.parametrize(("q", "expected"), [(0, 15), (5, 15), (30, 20), (40, 20), (50, 35),
                                             (99, 50), (100, 50)])
def test_percentile_is_nearest_rank(q, expected):
    # the textbook example: sorted [15, 20, 35, 40, 50]; rank = ceil(q / 100 * 5)
    assert percentile([50, 15, 40, 20, 35], q) == expected


def test_percentile_of_an_even_count_and_of_few_values():
    ten = list(range(1, 11))
    assert percentile(ten, 50) == 5  # the lower middle value, not 5.5
    assert percentile(ten, 90) == 9 and percentile(ten, 91) == 10
    assert percentile([0.3] * 11 + [7.0], 99) == 7.0  # fewer than 100 values: p99 is the max
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="101"):
        percentile([1.0], 101)


def _rec(arrival, first, end, tokens, prompt_len=10):
    return RequestRecord(arrival, prompt_len, tokens, first, end, tokens)


RECORDS = [
    _rec(0.0, 1.0, 2.0, 11),  # TTFT 1, TPOT 0.1, latency 2
    _rec(1.0, 4.5, 5.0, 6),  # TTFT 3.5 > 3
    _rec(2.0, 3.0, 8.0, 11),  # TPOT 0.5 > 0.2
    _rec(3.0, 4.0, 4.0, 1),  # no TPOT: meets on TTFT alone
    _rec(4.0, 6.0, 10.0, 21),  # TTFT 2, TPOT 0.2 (on the limit)
]


def test_summarize_counts_goodput_only_within_both_latency_targets():
    out = summarize(RECORDS, 6, slo=(3.0, 0.2))  # six submitted: one refused
    assert out["served"] == 5 and out["submitted"] == 6
    assert out["duration_s"] == 10.0
    assert out["generated_tokens"] == 50
    assert out["output_tok_s"] == pytest.approx(5.0)
    assert out["total_tok_s"] == pytest.approx((50 + 50) / 10.0)
    assert out["req_s"] == pytest.approx(0.5)
    assert out["goodput_tok_s"] == pytest.approx((11 + 1 + 21) / 10.0)
    assert out["slo_attainment"] == pytest.approx(3 / 6)


def test_summarize_percentiles_by_hand():
    out = summarize(RECORDS, 5)
    # TTFT sorted [1, 1, 1, 2, 3.5]; TPOT [0.1, 0.1, 0.2, 0.5]; latency [1, 2, 4, 6, 6]
    assert (out["ttft_p50_s"], out["ttft_p99_s"]) == (1.0, 3.5)
    assert out["tpot_p50_s"] == pytest.approx(0.1) and out["tpot_p99_s"] == pytest.approx(0.5)
    assert (out["latency_p50_s"], out["latency_p99_s"]) == (4.0, 6.0)
    assert "goodput_tok_s" not in out


def test_summarize_leaves_out_unfinished_requests_and_takes_a_given_duration():
    unfinished = RequestRecord(0.0, 10, 8, first_token_s=1.0, end_s=None, num_tokens=3)
    short = _rec(0.0, 1.0, 3.0, 2)
    short.max_new = 5  # ended before its max_new tokens
    out = summarize([unfinished, short], 2, duration_s=4.0, slo=(10.0, 10.0))
    assert out["served"] == 1 and out["cut_short"] == 1
    assert out["output_tok_s"] == pytest.approx(2 / 4.0)
    assert out["slo_attainment"] == 0.5
    empty = summarize([], 0, slo=(1.0, 1.0))
    assert empty["output_tok_s"] == 0.0 and empty["ttft_p99_s"] is None
    assert empty["slo_attainment"] == 0.0


def test_a_request_without_a_first_token_never_meets_an_slo():
    assert not RequestRecord(0.0, 1, 1, None, 1.0, 0).meets((1e9, 1e9))
    assert RequestRecord(0.0, 1, 1, 0.5, 0.5, 1).meets((0.5, 0.0))
