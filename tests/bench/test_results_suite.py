"""The results suite's measuring code (bench/run_all_workloads.py): workloads, the SLO figures,
the parallel clock and the online loop on a tiny engine."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from run_all_workloads import (  # noqa: E402
    Arrival,
    InstanceTimer,
    make_workload,
    prompt_lens,
    serve_online,
    summarize,
)

from infinillm import LLM, SamplingParams  # noqa: E402


def test_workload_is_seeded_and_rate_only_scales_arrivals():
    slow = make_workload("mixed", 12, 1.0, 512, 4, 8, seed=3)
    fast = make_workload("mixed", 12, 4.0, 512, 4, 8, seed=3)
    assert [a.prompt_ids for a in slow] == [a.prompt_ids for a in fast]
    assert [a.max_new for a in slow] == [a.max_new for a in fast]
    assert [a.at_s for a in slow] == pytest.approx([4 * a.at_s for a in fast])
    assert slow == make_workload("mixed", 12, 1.0, 512, 4, 8, seed=3)
    assert slow != make_workload("mixed", 12, 1.0, 512, 4, 8, seed=4)
    assert all(4 <= a.max_new <= 8 for a in slow)
    assert all(b.at_s > a.at_s for a, b in zip(slow, slow[1:]))


@pytest.mark.parametrize(("kind", "lo", "hi"), [("short", 100, 400), ("mixed", 100, 2400),
                                                ("long", 30, 3000)])
def test_prompt_lengths_stay_in_the_workload_range(kind, lo, hi):
    import random

    lens = prompt_lens(kind, 600, random.Random(0))
    assert lo <= min(lens) and max(lens) <= hi
    if kind == "mixed":
        assert 100 <= sum(n >= 600 for n in lens) <= 120  # one in six is long
    if kind == "long":  # log-uniform: a third of the lengths per factor of ~4.6
        assert 150 <= sum(n < 140 for n in lens) <= 250


def test_bad_workload_arguments_raise_value_error():
    with pytest.raises(ValueError, match="'huge'"):
        make_workload("huge", 3, 1.0, 512, 1, 2, seed=0)
    with pytest.raises(ValueError, match="-1"):
        make_workload("short", 3, -1, 512, 1, 2, seed=0)


def test_goodput_counts_only_requests_within_both_latency_targets():
    def req(arrival, first, end, tokens):
        return {"arrival": arrival, "first": first, "end": end, "tokens": tokens,
                "max_new": tokens, "prompt_len": 10}

    meta = {
        "ok": req(0.0, 1.0, 2.0, 11),      # TTFT 1, TPOT 0.1
        "slow_first": req(1.0, 4.5, 5.0, 6),  # TTFT 3.5 > 3
        "slow_decode": req(2.0, 3.0, 8.0, 11),  # TPOT 0.5 > 0.2
        "one_token": req(3.0, 4.0, 4.0, 1),  # no TPOT: meets on TTFT alone
        "ok_late": req(4.0, 6.0, 10.0, 21),  # TTFT 2, TPOT 0.2 (on the limit)
    }
    workload = [Arrival(0.0, [1], 1)] * 6  # six submitted: one refused
    out = summarize(meta, workload, 1, {}, {}, 0, 0, [], slo=(3.0, 0.2))
    assert out["served"] == 5 and out["refused"] == 1
    assert out["duration_s"] == 10.0
    assert out["generated_tokens"] == 11 + 6 + 11 + 1 + 21
    assert out["goodput_tok_s"] == pytest.approx((11 + 1 + 21) / 10.0)
    assert out["slo_attainment"] == pytest.approx(3 / 6)
    assert out["output_tok_s"] == pytest.approx(50 / 10.0)


class _SleepyWorker:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def execute(self, plan):
        time.sleep(self.seconds)
        return {}


class _FakeEngine:
    def __init__(self, seconds: list[float]) -> None:
        self.executor = type("X", (), {})()
        self.executor.workers = {i: _SleepyWorker(s) for i, s in enumerate(seconds)}

    def step(self):
        plan = SimpleNamespace(chunks=[SimpleNamespace(token_ids=[1, 2, 3])])
        for worker in self.executor.workers.values():  # in turn, as the in-process executor
            worker.execute(plan)


def test_parallel_clock_charges_the_slowest_instance_not_the_sum():
    engine = _FakeEngine([0.02, 0.08, 0.04])
    timer = InstanceTimer(engine)
    t0 = time.perf_counter()
    time.sleep(0.03)  # the driver's own share of the step
    engine.step()
    wall = time.perf_counter() - t0
    parallel = timer.parallel_seconds(wall)
    assert wall >= 0.03 + 0.14
    # the two faster instances' time is taken out (sleeps only overshoot), the rest is kept
    assert 0.03 + 0.08 <= parallel <= wall - (0.02 + 0.04)
    assert timer.parallel_seconds(0.5) == 0.5  # reset: no worker ran since
    assert timer.computed_tokens == 3 * 3  # three workers ran a chunk of three tokens


def test_parallel_clock_needs_in_process_workers():
    with pytest.raises(ValueError, match="inproc"):
        InstanceTimer(object())


@pytest.mark.parametrize("clock", ["wall", "parallel"])
def test_online_loop_serves_every_request_and_keeps_the_pools_whole(tiny_llama, clock):
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=24, num_instances=2,
              lending=True)
    workload = make_workload("short", 6, 20.0, 512, 3, 6, seed=1)
    workload = [Arrival(a.at_s, a.prompt_ids[: 20 + 5 * i], a.max_new)
                for i, a in enumerate(workload)]
    workload.append(Arrival(workload[-1].at_s, list(range(100, 230)), 4))  # needs 2 pools
    workload.append(Arrival(workload[-1].at_s, list(range(100, 300)), 4))  # beyond the cluster
    t0 = time.perf_counter()
    out = serve_online(llm, workload, SamplingParams, keep_timeline=True, clock=clock,
                       slo=(1e9, 1e9))
    elapsed = time.perf_counter() - t0
    assert out["refused"] == 1 and out["served"] == len(workload) - 1
    assert out["generated_tokens"] == sum(a.max_new for a in workload[:-1])
    assert out["slo_attainment"] == pytest.approx(out["served"] / len(workload))
    assert out["max_borrowed_blocks"] > 0
    # the run ends after the last arrival; the parallel clock skips idle gaps instead of waiting
    skipped = workload[-1].at_s if clock == "parallel" else 0.0
    assert workload[-2].at_s < out["duration_s"] <= elapsed + skipped
    assert len(out["timeline"][0]) == 1 + 2  # time, then one entry per instance
    stats = llm.cluster_stats()["instances"]
    assert all(i["free_blocks"] == i["total_blocks"] for i in stats)
    llm.shutdown()
