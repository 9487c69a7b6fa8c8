"""bench.lib.online and bench.lib.ours: the online loop on both clocks, against a scripted engine
(exact times) and a small real engine (every request served, pools whole)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from bench.lib.online import StepClock, WallClock, run_arrivals
from bench.lib.ours import longest_admitted, refusal, serve_one, serve_online
from bench.lib.workloads import Arrival, make_workload
from infinillm import LLM
from infinillm.types import InstanceId, InstanceStep, StepRecord


class ScriptedEngine:
    """One token per admitted request per step; every step takes `driver_s` plus the instances'
    `instance_s` one after another, published as `last_step` like ClusterEngine's."""

    def __init__(self, driver_s: float, instance_s: tuple[float, ...], max_prompt: int) -> None:
        self.driver_s, self.instance_s, self.max_prompt = driver_s, instance_s, max_prompt
        self.active: dict[str, list[int]] = {}
        self.last_step = None
        self.num_steps = 0

    def admit(self, arrival: Arrival, index: int) -> str | None:
        if len(arrival.prompt_ids) > self.max_prompt:
            return None
        self.active[f"r{index}"] = [0, arrival.max_new]
        return f"r{index}"

    def has_unfinished(self) -> bool:
        return bool(self.active)

    def step(self):
        outs = []
        for rid, state in list(self.active.items()):
            state[0] += 1
            done = state[0] == state[1]
            outs.append(SimpleNamespace(request_id=rid, finished=done,
                                        outputs=[SimpleNamespace(token_ids=[7] * state[0])]))
            if done:
                del self.active[rid]
        seconds = self.driver_s + sum(self.instance_s)
        steps = tuple(InstanceStep(InstanceId(i), 1, 1, s) for i, s in enumerate(self.instance_s))
        self.last_step = StepRecord(index=self.num_steps, start_s=0.0, end_s=seconds,
                                    instances=steps, num_moves=0, num_preempted=0,
                                    num_finished=sum(o.finished for o in outs))
        self.num_steps += 1
        return outs


WORKLOAD = [Arrival(0.0, [1, 2], 2), Arrival(0.0, [1] * 50, 2), Arrival(5.0, [3], 3)]


def test_parallel_clock_charges_the_driver_and_the_slowest_instance_and_skips_idle_time():
    engine = ScriptedEngine(0.1, (0.2, 0.5, 0.1), max_prompt=10)
    clock = StepClock(lambda: engine.last_step.parallel_seconds())  # 0.1 + 0.5 a step
    seen = []
    records, refused = run_arrivals(WORKLOAD, engine, clock, seen.append)
    assert refused == 1 and set(records) == {"r0", "r2"}
    assert seen == pytest.approx([0.6, 1.2, 5.6, 6.2, 6.8])  # idle from 1.2 to 5.0: skipped
    r0, r2 = records["r0"], records["r2"]
    assert (r0.arrival_s, r0.first_token_s, r0.end_s, r0.num_tokens) == pytest.approx(
        (0.0, 0.6, 1.2, 2))
    assert (r2.arrival_s, r2.first_token_s, r2.end_s, r2.num_tokens) == pytest.approx(
        (5.0, 5.6, 6.8, 3))
    assert r2.tpot_s == pytest.approx(0.6)


def test_wall_clock_waits_for_arrivals():
    engine = ScriptedEngine(0.0, (0.0,), max_prompt=10)
    workload = [Arrival(0.0, [1], 1), Arrival(0.15, [2], 1)]
    t0 = time.perf_counter()
    records, refused = run_arrivals(workload, engine, WallClock())
    assert refused == 0 and time.perf_counter() - t0 >= 0.15
    assert records["r1"].first_token_s >= 0.15 and records["r1"].end_s >= 0.15


@pytest.mark.parametrize("clock", ["wall", "parallel"])
def test_online_loop_serves_every_request_and_keeps_the_pools_whole(tiny_llama, clock):
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=24, num_instances=2,
              lending=True)
    workload = make_workload("short", 6, 512, seed=1, new_tokens=(3, 6), rate=20.0)
    workload = [Arrival(a.at_s, a.prompt_ids[: 20 + 5 * i], a.max_new)
                for i, a in enumerate(workload)]
    workload.append(Arrival(workload[-1].at_s, list(range(100, 230)), 4))  # needs 2 pools
    workload.append(Arrival(workload[-1].at_s, list(range(100, 300)), 4))  # beyond the cluster
    t0 = time.perf_counter()
    out = serve_online(llm, workload, clock=clock, slo=(1e9, 1e9), keep_timeline=True)
    elapsed = time.perf_counter() - t0
    assert out["refused"] == 1 and out["served"] == len(workload) - 1
    assert out["generated_tokens"] == sum(a.max_new for a in workload[:-1])
    assert out["slo_attainment"] == pytest.approx(out["served"] / len(workload))
    assert out["max_borrowed_blocks"] > 0 and out["max_lent_blocks"] > 0
    assert out["preemptions"] >= 0 and out["remote_bytes"] > 0
    # the run ends after the last arrival; the parallel clock skips idle gaps instead of waiting
    skipped = workload[-1].at_s if clock == "parallel" else 0.0
    assert workload[-2].at_s < out["duration_s"] <= elapsed + skipped
    assert len(out["timeline"][0]) == 1 + 2  # time, then one entry per instance
    assert isinstance(llm.engine.last_step, StepRecord)
    stats = llm.cluster_stats()["instances"]
    assert all(i["free_blocks"] == i["total_blocks"] for i in stats)
    llm.shutdown()


def test_longest_admitted_prompt_is_served_across_two_pools(tiny_llama):
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=8, num_instances=2,
              lending=True, max_lent_fraction=0.5)
    engine = llm.engine
    n = longest_admitted(engine)
    assert refusal(engine, n) is None and refusal(engine, n + 1) is not None
    assert n > 8 * 4  # more than one pool: the rest is borrowed
    served = serve_one(llm, list(range(100, 100 + n)), max_tokens=2)
    assert served["completed"] and served["max_borrowed_blocks"] > 0
    assert served["max_holders"] == 2
    assert all(i["free_blocks"] == i["total_blocks"] for i in served["stats"]["instances"])
    llm.shutdown()
