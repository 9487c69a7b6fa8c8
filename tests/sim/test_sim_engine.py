"""The real control plane on the simulated executor: conservation at every step, every request
served with its scripted length, simulated time that adds up, and the `simulate` command."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinillm.cli import main
from infinillm.sim import run as run_module
from infinillm.sim.run import (
    SimSetup,
    build_sim_engine,
    longest_context,
    run_async,
    run_trace,
    simulate,
)
from infinillm.sim.traces import TraceRequest, write_trace

REQUIRED_KEYS = ("policy", "instances", "completed", "refused", "output_tokens_per_s",
                 "total_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                 "preemptions", "longest_context_tokens", "simulated_s", "wall_s")


def random_trace(seed: int, n: int, max_prompt: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    at, out = 0.0, []
    for _ in range(n):
        at += rng.expovariate(20.0)
        out.append(TraceRequest(at, rng.randint(1, max_prompt), rng.randint(1, 30)))
    return out


def small(policy: str, **kw) -> SimSetup:
    return SimSetup(model="llama2-7b", instances=3, policy=policy, kv_blocks_per_instance=24,
                    max_num_seqs=8, max_num_batched_tokens=64, **kw)


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6),
       policy=st.sampled_from(["lending", "proactive", "multi", "single"]),
       loop=st.sampled_from(["lockstep", "async"]))
def test_every_step_conserves_blocks_and_every_request_gets_its_tokens(seed, policy, loop):
    # prompts up to 600 tokens: beyond one pool of 24 x 16 = 384, within the cluster's
    trace = random_trace(seed, 16, 600)
    engine = build_sim_engine(small(policy))
    if loop == "lockstep":
        times = []
        records = run_trace(engine, trace, check_integrity=True,
                            on_step=lambda e: times.append(e.clock.now()))
        assert times == sorted(times)
    else:
        records = run_async(engine, trace, check_integrity=True)
    for req, rec in zip(trace, records):
        if rec.refused:  # only a prompt no instance (and no loan) can hold is refused
            assert policy == "multi" and req.prompt_tokens + 1 > 24 * 16
            continue
        assert rec.end_s is not None and rec.first_token_s >= req.arrival_s
        if rec.completed:
            assert rec.num_tokens == req.output_tokens
        else:  # cut short: only without lending, a request outgrowing its pool
            assert policy == "multi" and req.prompt_tokens + req.output_tokens > 24 * 16
    assert engine.num_free_blocks() == [engine.num_blocks_per_instance] * len(engine.instances)
    if policy in ("lending", "proactive"):
        assert engine.cluster_stats()["debts"] == []


def test_async_instances_each_keep_their_own_clock(monkeypatch):
    """The paper's vLLM-multi: separate servers. On its own timeline, each instance serves the
    requests routed to it exactly as a one-instance server given only those requests would;
    a long prefill on one does not hold up the decodes of the others, as it does when the
    engine steps every instance together."""
    # one long prompt, then short requests that the router spreads over the other instances
    trace = [TraceRequest(0.0, 1500, 2)] + [TraceRequest(0.01 * i, 20, 20) for i in range(1, 9)]
    setup = dict(model="llama2-7b", instances=3, policy="multi", kv_blocks_per_instance=200,
                 max_num_batched_tokens=64)
    routed = {}
    admit = run_module._admit

    def noting_admit(engine, rec, bar):
        rid = admit(engine, rec, bar)
        routed[id(rec)] = engine.streams[rid].request.instance_id
        return rid

    monkeypatch.setattr(run_module, "_admit", noting_admit)
    engine = build_sim_engine(SimSetup(**setup))
    records = run_async(engine, trace, check_integrity=True)
    monkeypatch.undo()
    assert [r.num_tokens for r in records] == [2] + [20] * 8
    owners = [routed[id(r)] for r in records]
    assert len(set(owners)) == 3  # the router spread them
    for iid in set(owners):
        mine = [req for req, o in zip(trace, owners) if o == iid]
        alone = run_trace(build_sim_engine(SimSetup(**{**setup, "instances": 1})), mine)
        ours = [rec for rec, o in zip(records, owners) if o == iid]
        for a, b in zip(alone, ours):
            assert (a.first_token_s, a.end_s) == pytest.approx((b.first_token_s, b.end_s),
                                                               rel=1e-9, abs=1e-12)
    assert engine.num_free_blocks() == [200] * 3
    together = simulate(SimSetup(lockstep=True, **setup), trace)
    apart = simulate(SimSetup(**setup), trace)
    assert apart["completed"] == together["completed"] == 9
    assert apart["tpot_p50_s"] < together["tpot_p50_s"]


def test_serial_instances_take_the_sum_and_concurrent_ones_the_slowest():
    trace = random_trace(1, 12, 300)
    serial = simulate(small("lending", concurrent=False), trace)
    concurrent = simulate(small("lending"), trace)
    assert concurrent["simulated_s"] < serial["simulated_s"]
    # per step, the engine's clock moved by what the executor modelled
    engine = build_sim_engine(small("multi", concurrent=False))
    steps = []

    def note(e):
        costs = e.executor.last_costs
        steps.append((e.last_step.seconds, sum(c.seconds for c in costs.values())))

    run_trace(engine, trace, on_step=note)
    assert all(abs(s - m) < 1e-12 for s, m in steps if m)


def test_lending_serves_longer_contexts_than_one_pool():
    multi = longest_context(small("multi"))
    lending = longest_context(small("lending"))
    assert multi["longest_context_tokens"] == 24 * 16 - 1  # one pool, room for one token
    assert multi["served"] is True
    # a pool of its own plus what the two others may lend (90 % of 24 blocks each)
    assert lending["longest_context_tokens"] == (24 + 2 * 21) * 16 - 1
    assert lending["served"] is True


def test_simulate_command_prints_a_table_and_one_json_line(capsys, tmp_path):
    path = tmp_path / "trace.jsonl"
    write_trace(path, random_trace(3, 10, 2000))
    code = main(["simulate", "--model", "llama2-7b", "--device", "h100-80gb", "--instances",
                 "2", "--trace", str(path), "--policy", "lending", "--longest-context",
                 "--json"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("simulated (modelled, not measured)")
    result = json.loads(lines[-1])
    assert all(key in result for key in REQUIRED_KEYS)
    assert result["completed"] == 10 and result["instances"] == 2
    assert result["longest_context_tokens"] > 100_000


@pytest.mark.parametrize("flag, value, valid", [
    ("--model", "gpt-9", "llama2-7b, llama2-13b, llama2-70b, llama3-8b, llama3-70b"),
    ("--device", "b200", "a100-80gb, h100-80gb, h200-141gb, cpu"),
    ("--trace", "medium", "'short', 'long', 'mixed'"),
    ("--policy", "best", "lending, proactive, multi, single")])
def test_simulate_rejects_unknown_names_with_the_valid_ones(capsys, flag, value, valid):
    assert main(["simulate", flag, value, "--num-requests", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and value in err[0] and valid in err[0]
