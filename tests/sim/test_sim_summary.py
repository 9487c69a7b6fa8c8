"""infinillm.sim.run.summarize's loaded figures: output tokens produced while requests still
arrive (each request's tokens spread evenly from its first token to its end), by hand."""

from __future__ import annotations

import pytest

from infinillm.sim.run import Record, summarize


def _done(arrival: float, first: float, end: float, tokens: int) -> Record:
    return Record(arrival, 10, tokens, first_token_s=first, end_s=end, num_tokens=tokens)


def test_loaded_throughput_counts_what_was_produced_until_the_last_arrival():
    records = [
        _done(0.0, 1.0, 5.0, 5),  # all 5 tokens before the last arrival (10 s); in the SLO
        _done(2.0, 4.0, 16.0, 7),  # 1 + 6 x (10 - 4) / (16 - 4) = 4 tokens by 10 s; TTFT 2 s
        _done(10.0, 12.0, 20.0, 3),  # nothing before 10 s
    ]
    out = summarize(records, slo=(1.5, 1.5))
    assert out["loaded_output_tokens_per_s"] == pytest.approx((5 + 4 + 0) / 10)
    assert out["loaded_goodput_tokens_per_s"] == pytest.approx(5 / 10)
    assert out["output_tokens_per_s"] == pytest.approx(15 / 20)  # the whole run, drain included


def test_loaded_throughput_leaves_out_unfinished_requests_and_offline_traces():
    cut = Record(1.0, 10, 8, first_token_s=2.0, end_s=4.0, num_tokens=3)  # cut short
    out = summarize([_done(0.0, 1.0, 3.0, 4), cut], slo=None)
    # by the last arrival (1 s): the first token of the finished one; the cut one never counts
    assert out["loaded_output_tokens_per_s"] == pytest.approx(1.0)
    assert "loaded_goodput_tokens_per_s" not in out
    offline = summarize([_done(0.0, 1.0, 3.0, 4), _done(0.0, 1.0, 2.0, 2)], slo=(9.0, 9.0))
    assert offline["loaded_output_tokens_per_s"] is None
    assert offline["loaded_goodput_tokens_per_s"] is None
