"""infinillm.sim.traces: seeded, documented request traces and their JSONL form."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from infinillm.sim import traces
from infinillm.sim.traces import (
    TRACE_KINDS,
    TraceRequest,
    describe,
    expected_means,
    load_trace,
    make_trace,
    resolve_trace,
    write_trace,
)

# The documented target means (module docstring), written out here as the independent reference:
# ShareGPT from the vLLM paper; L-Eval from its Table 1 and README; mixed = 0.9 short + 0.1 long.
TARGET_MEANS = {
    "short": (161.31, 337.99),
    "long": (16364.78, 77.69),
    "mixed": (1781.66, 311.96),
}


def _lengths(trace):
    return [(r.prompt_tokens, r.output_tokens) for r in trace]


@pytest.mark.parametrize("kind", TRACE_KINDS)
def test_same_seed_same_trace_and_other_seeds_differ(kind):
    a = make_trace(kind, 50, rate=2.0, seed=7)
    assert a == make_trace(kind, 50, rate=2.0, seed=7)
    b = make_trace(kind, 50, rate=2.0, seed=8)
    assert _lengths(a) != _lengths(b)
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]


@pytest.mark.parametrize("kind", TRACE_KINDS)
def test_rate_only_scales_arrivals(kind):
    slow = make_trace(kind, 40, rate=0.5, seed=3)
    fast = make_trace(kind, 40, rate=8.0, seed=3)
    offline = make_trace(kind, 40, rate=None, seed=3)
    assert _lengths(slow) == _lengths(fast) == _lengths(offline)
    assert [r.arrival_s * 0.5 for r in slow] == pytest.approx([r.arrival_s * 8.0 for r in fast])
    assert all(r.arrival_s == 0.0 for r in offline)
    arrivals = [r.arrival_s for r in fast]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


@pytest.mark.parametrize("kind", TRACE_KINDS)
def test_prefix_of_a_longer_trace_is_the_shorter_trace(kind):
    assert make_trace(kind, 30, rate=1.0, seed=1)[:10] == make_trace(kind, 10, rate=1.0, seed=1)


@pytest.mark.parametrize("kind", TRACE_KINDS)
def test_sample_means_match_documented_targets(kind):
    n = 20_000
    trace = make_trace(kind, n, rate=None, seed=0)
    for index, (field, target) in enumerate(zip(("prompt_tokens", "output_tokens"),
                                                TARGET_MEANS[kind], strict=True)):
        assert expected_means(kind)[index] == pytest.approx(target, abs=0.01)
        values = [getattr(r, field) for r in trace]
        mean = statistics.fmean(values)
        stderr = statistics.pstdev(values) / math.sqrt(n)
        # Five standard errors: a seed-independent bound that still catches a wrong parameter.
        assert abs(mean - target) < 5 * stderr, (kind, field, mean, target, stderr)
        assert min(values) >= 1


def test_kinds_differ_in_scale():
    short = describe(make_trace("short", 2000, rate=None, seed=0))
    long = describe(make_trace("long", 2000, rate=None, seed=0))
    mixed = describe(make_trace("mixed", 2000, rate=None, seed=0))
    assert short["prompt_tokens_p50"] < 200 < 2000 < long["prompt_tokens_p50"]
    assert mixed["prompt_tokens_p50"] < 200 and mixed["prompt_tokens_max"] > 20_000


def test_docstring_holds_every_leval_number():
    for name, _, avg_len, num_instr in traces.LEVAL_TASKS:
        assert f"{name} {avg_len:,} ({num_instr})" in traces.__doc__


@pytest.mark.parametrize("kind", TRACE_KINDS)
def test_max_context_caps_each_request_by_cutting_the_prompt(kind):
    free = make_trace(kind, 300, rate=1.0, seed=2)
    capped = make_trace(kind, 300, rate=1.0, seed=2, max_context=1000)
    assert [r.arrival_s for r in free] == [r.arrival_s for r in capped]
    for f, c in zip(free, capped, strict=True):
        assert c.prompt_tokens + c.output_tokens <= 1000 and c.prompt_tokens >= 1
        if f.prompt_tokens + f.output_tokens <= 1000:
            assert c == f
        elif f.output_tokens < 1000:
            assert (c.prompt_tokens, c.output_tokens) == (1000 - f.output_tokens, f.output_tokens)
        else:
            assert (c.prompt_tokens, c.output_tokens) == (1, 999)
    tiny = make_trace(kind, 20, rate=None, seed=2, max_context=2)
    assert all((r.prompt_tokens, r.output_tokens) == (1, 1) for r in tiny)


@pytest.mark.parametrize("kwargs, bad", [
    (dict(kind="huge"), "'huge'"),
    (dict(rate=0.0), "0.0"),
    (dict(rate=-1.0), "-1.0"),
    (dict(rate=float("nan")), "nan"),
    (dict(num_requests=-1), "-1"),
    (dict(max_context=1), "1"),
])
def test_make_trace_rejects_bad_arguments(kwargs, bad):
    args = dict(kind="short", num_requests=3, rate=1.0, seed=0, max_context=None) | kwargs
    kind, num_requests = args.pop("kind"), args.pop("num_requests")
    with pytest.raises(ValueError, match=bad):
        make_trace(kind, num_requests, **args)


def test_jsonl_round_trip(tmp_path):
    trace = make_trace("mixed", 25, rate=3.0, seed=4)
    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    assert load_trace(path) == trace
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]).keys() == {"arrival_s", "prompt_tokens", "output_tokens"}
    path.write_text("\n" + lines[0] + "\n\n   \n" + lines[1] + "\n")  # blank lines are skipped
    assert load_trace(path) == trace[:2]


GOOD = '{"arrival_s": 0.5, "prompt_tokens": 10, "output_tokens": 4}'


@pytest.mark.parametrize("line, bad", [
    ('{"arrival_s": 1.0, "prompt_tokens": 10', "not valid JSON"),
    ('[1.0, 10, 4]', r"\[1.0, 10, 4\]"),
    ('{"arrival_s": 1.0, "prompt_tokens": 10}', "missing \\['output_tokens'\\]"),
    ('{"arrival_s": 1.0, "prompt_tokens": 10, "output_tokens": 4, "id": 3}', "extra \\['id'\\]"),
    ('{"arrival_s": "1.0", "prompt_tokens": 10, "output_tokens": 4}', "'1.0'"),
    ('{"arrival_s": true, "prompt_tokens": 10, "output_tokens": 4}', "True"),
    ('{"arrival_s": -0.5, "prompt_tokens": 10, "output_tokens": 4}', "-0.5"),
    ('{"arrival_s": NaN, "prompt_tokens": 10, "output_tokens": 4}', "nan"),
    ('{"arrival_s": 1.0, "prompt_tokens": 0, "output_tokens": 4}', "prompt_tokens .* got 0"),
    ('{"arrival_s": 1.0, "prompt_tokens": 10, "output_tokens": 0}', "output_tokens .* got 0"),
    ('{"arrival_s": 1.0, "prompt_tokens": 10.5, "output_tokens": 4}', "10.5"),
    ('{"arrival_s": 1.0, "prompt_tokens": false, "output_tokens": 4}', "False"),
    ('{"arrival_s": 1.0, "prompt_tokens": "10", "output_tokens": 4}', "'10'"),
    ('{"arrival_s": 0.25, "prompt_tokens": 10, "output_tokens": 4}', "0.25 is before .* 0.5"),
])
def test_load_trace_names_file_line_and_value(tmp_path, line, bad):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=bad) as info:
        load_trace(path)
    assert f"{path}:3:" in str(info.value)


def test_load_trace_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(ValueError, match="nowhere.jsonl"):
        load_trace(path)


def test_describe_reports_nearest_rank_statistics():
    trace = [TraceRequest(0.5, 10, 1), TraceRequest(1.0, 20, 2), TraceRequest(2.5, 30, 300)]
    stats = describe(trace)
    assert stats == {
        "num_requests": 3,
        "prompt_tokens_mean": 20.0, "prompt_tokens_p50": 20, "prompt_tokens_p99": 30,
        "prompt_tokens_max": 30,
        "output_tokens_mean": 101.0, "output_tokens_p50": 2, "output_tokens_p99": 300,
        "output_tokens_max": 300,
        "total_tokens": 363, "duration_s": 2.0,
    }
    empty = describe([])
    assert empty["num_requests"] == 0 and empty["total_tokens"] == 0
    assert empty["prompt_tokens_mean"] is None and empty["duration_s"] is None


def test_resolve_trace_for_kinds():
    assert resolve_trace("long", 5, 2.0, 9, 4096) == make_trace(
        "long", 5, rate=2.0, seed=9, max_context=4096)
    with pytest.raises(ValueError, match="needs num_requests"):
        resolve_trace("short", None, None, 0, None)


def test_resolve_trace_for_files(tmp_path):
    trace = [TraceRequest(0.0, 100, 20), TraceRequest(1.5, 5000, 50), TraceRequest(2.0, 7, 3)]
    path = tmp_path / "rec.jsonl"
    write_trace(path, trace)
    spec = str(path)
    assert resolve_trace(spec, None, None, 0, None) == trace
    assert resolve_trace(spec, 2, None, 0, None) == trace[:2]
    assert resolve_trace(spec, None, None, 0, 1000)[1] == TraceRequest(1.5, 950, 50)
    with pytest.raises(ValueError, match="own arrival times; rate must be None, got 2.0"):
        resolve_trace(spec, None, 2.0, 0, None)
    with pytest.raises(ValueError, match=r"\[0, 3\].*got 4"):
        resolve_trace(spec, 4, None, 0, None)


def test_resolve_trace_unknown_spec_lists_the_kinds(tmp_path):
    for spec in ("sharegpt", str(tmp_path / "missing.jsonl")):
        with pytest.raises(ValueError, match="'short', 'long', 'mixed'"):
            resolve_trace(spec, 10, None, 0, None)
