"""The engine's seams: an executor that runs no model, on a virtual clock, drives the very same
engine, schedulers, ledger and rebalancer (what a simulated cluster plugs into)."""

from __future__ import annotations

import pytest

from infinillm.config import Config
from infinillm.engine import ClusterEngine, VirtualClock, WallClock
from infinillm.runtime.executor import Executor, InstanceLost, StepResult
from infinillm.runtime.fabric import FabricStats
from infinillm.runtime.traffic import tokens_by_holder
from infinillm.types import InstanceId, SamplingParams

SECONDS_PER_TOKEN = 0.001
STEP_OVERHEAD_S = 0.01


class ScriptedExecutor(Executor):
    """Samples token 5 for every request that samples; a step of an instance takes a fixed
    overhead plus a cost per token. Records what it was asked to do."""

    def __init__(self, config, spec, instance_ids) -> None:
        self.instance_ids = list(instance_ids)
        self.num_blocks = spec.num_blocks
        self.moves = []
        self.plans = []

    def execute(self, plans):
        self.plans.append(plans)
        result = StepResult({}, {})
        for plan in plans:
            for chunk in plan.chunks:
                for holder, block in chunk.blocks:
                    assert holder in self.instance_ids and 0 <= block < self.num_blocks
                if chunk.sample:
                    result.sampled[chunk.request_id] = 5
            if plan.chunks:
                result.seconds[plan.instance_id] = (STEP_OVERHEAD_S
                                                    + SECONDS_PER_TOKEN * plan.num_tokens)
        return result

    def move_blocks(self, moves):
        self.moves += moves
        return 0.0

    def fabric_stats(self, max_age_s: float = 0.2) -> FabricStats:
        return FabricStats()


def engine_on(tiny_llama, clock, **settings) -> ClusterEngine:
    config = Config.from_kwargs(model=tiny_llama, block_size=4, **settings)
    return ClusterEngine.from_config(config, clock, ScriptedExecutor)


def test_virtual_time_moves_by_the_slowest_instance_of_each_step(tiny_llama):
    clock = VirtualClock()
    engine = engine_on(tiny_llama, clock, num_instances=2, kv_blocks_per_instance=16,
                       max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request([7] * n, params) for n in (30, 9, 17)]
    done, expected_now = {}, 0.0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        record = engine.last_step
        busy = [i for i in record.instances if i.num_tokens]
        slowest = max((STEP_OVERHEAD_S + SECONDS_PER_TOKEN * i.num_tokens for i in busy),
                      default=0.0)
        assert record.start_s == pytest.approx(expected_now)
        expected_now += slowest
        assert record.end_s == pytest.approx(expected_now) == clock.now()
        assert record.num_tokens == sum(i.num_tokens for i in record.instances)
        done.update({o.request_id: o for o in outputs if o.finished})
        engine.check_integrity()
    assert sorted(done) == sorted(ids)
    assert all(o.outputs[0].token_ids == [5] * 6 for o in done.values())
    assert engine.num_free_blocks() == [16, 16]
    assert engine.last_step.index == engine.num_steps - 1


def test_borrowing_and_recall_run_without_a_model(tiny_llama):
    """A prompt longer than one pool borrows; the ledger and pools stay whole every step."""
    engine = engine_on(tiny_llama, VirtualClock(), num_instances=3, kv_blocks_per_instance=8,
                       max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    rid = engine.add_request([7] * 50, params)  # one pool holds 8 blocks (32 positions)
    max_borrowed = 0
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_integrity()
        max_borrowed = max(max_borrowed, sum(i.rmanager.num_borrowed_blocks()
                                             for i in engine.instances))
    # after the step before the last, 56 positions are stored: 14 blocks, 6 of them borrowed
    assert max_borrowed == 6 and engine.num_free_blocks() == [8, 8, 8]
    assert engine.cluster_stats()["debts"] == [] and rid not in engine.streams


def test_wall_clock_is_the_default(tiny_llama):
    engine = engine_on(tiny_llama, None, kv_blocks_per_instance=4)
    assert isinstance(engine.clock, WallClock)
    engine.add_request([7, 8], SamplingParams(max_tokens=1, temperature=0.0))
    engine.step()
    assert engine.last_step.end_s >= engine.last_step.start_s


def test_an_abort_during_a_standstill_lets_the_survivor_go_on(tiny_llama):
    """Two requests that each fill their pool and wait for the other's blocks: a standstill.
    A client aborting one of them before the next step frees blocks; the other must borrow
    them and go on, not end as if it could never fit."""
    engine = engine_on(tiny_llama, VirtualClock(), num_instances=2, kv_blocks_per_instance=8,
                       max_lent_fraction=0.5)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    a, b = (engine.add_request([7] * 26, params) for _ in range(2))
    for _ in range(50):
        engine.step()
        if engine.last_step.num_tokens == 0:
            break
    assert engine.last_step.num_tokens == 0 and engine.has_unfinished_requests()
    engine.abort_request(b)
    outputs = engine.step()
    assert [(o.request_id, o.finished) for o in outputs] == [(a, False)]
    while engine.has_unfinished_requests():
        outputs = engine.step()
        engine.check_integrity()
    # then it outgrows its pool plus the 4 blocks the other may lend (48 positions): alone and
    # stalled, it ends with "length" after 26 + 22 stored positions and one more sample
    assert outputs[0].outputs[0].token_ids == [5] * 23
    assert outputs[0].outputs[0].finish_reason == "length"


class HolderCheckingExecutor(ScriptedExecutor):
    """Checks during each step that every chunk's blocks per holder, and the positions each
    holder stores (`tokens_by_holder`, a simulator's cost input), match a count over its
    blocks."""

    num_spread = 0  # chunks whose blocks were on more than one instance

    def execute(self, plans):
        for plan in plans:
            for c in plan.chunks:
                counts: dict[InstanceId, int] = {}
                for holder, _ in c.blocks:
                    counts[holder] = counts.get(holder, 0) + 1
                assert c.holders == counts
                stored: dict[InstanceId, int] = {}
                for pos in range(c.start_pos + len(c.token_ids)):
                    holder = c.blocks[pos // 4][0]
                    stored[holder] = stored.get(holder, 0) + 1
                assert tokens_by_holder(c, 4) == stored
                self.num_spread += len(counts) > 1
        return super().execute(plans)


def test_chunks_count_their_blocks_per_holder_through_borrowing_and_moves(tiny_llama):
    config = Config.from_kwargs(model=tiny_llama, block_size=4, num_instances=3,
                                kv_blocks_per_instance=8, max_num_batched_tokens=16)
    engine = ClusterEngine.from_config(config, VirtualClock(), HolderCheckingExecutor)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for n in (50, 9, 20, 5):  # the first borrows; blocks come home as the others finish
        engine.add_request([7] * n, params)
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_integrity()
    assert engine.executor.num_spread > 0 and engine.rebalancer.num_moves > 0


def test_the_integrity_check_recounts_the_queue(tiny_llama):
    engine = engine_on(tiny_llama, VirtualClock(), kv_blocks_per_instance=4)
    engine.add_request([7, 8, 9], SamplingParams(max_tokens=1))  # 4 positions: 1 block
    engine.check_integrity()
    engine.instances[0].scheduler._queued_blocks += 1
    with pytest.raises(RuntimeError, match="queue needs 1 blocks, the running total says 2"):
        engine.check_integrity()


class LosingExecutor(ScriptedExecutor):
    """Loses instance 1 in its second step, as a Ray executor whose actor died."""

    def execute(self, plans):
        if len(self.plans) == 1:
            self.plans.append(plans)
            raise InstanceLost([InstanceId(1)], "test")
        return super().execute(plans)


def test_a_lost_instance_is_settled_at_once_and_what_no_longer_fits_ends(tiny_llama):
    config = Config.from_kwargs(model=tiny_llama, block_size=4, num_instances=3,
                                kv_blocks_per_instance=8)
    engine = ClusterEngine.from_config(config, VirtualClock(), LosingExecutor)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    long_id = engine.add_request([7] * 60, params)  # 16 blocks: 8 own + 7 + 7 lendable
    short_ids = [engine.add_request([7] * 5, params) for _ in range(2)]
    engine.step()
    outputs = engine.step()  # the executor loses instance 1: nothing of the step is applied
    assert [i.instance_id for i in engine.instances] == [0, 2]
    # 8 own + 7 lendable blocks are all one request can get now: the long one ends at once
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in outputs] == [
        (long_id, True, "length")]
    engine.check_integrity()
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
        engine.check_integrity()
    assert sorted(done) == sorted(short_ids)
    assert all(o.outputs[0].token_ids == [5] * 4 for o in done.values())
    assert engine.num_free_blocks() == [8, 8] and engine.cluster_stats()["debts"] == []
