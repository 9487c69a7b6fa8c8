"""The scheduler alone over a small RManager: exact plans, block ids, preemptions and endings.

No model runs: `advance` does what the engine's update does with a plan (computed tokens move
on, a sampling chunk appends one token).
"""

from __future__ import annotations

import pytest

from infinillm.cluster import Demand, GManager, RManager, choose_victim
from infinillm.config import SchedulerConfig
from infinillm.engine.scheduler import Scheduler, SchedulerOutput
from infinillm.types import (
    FinishReason,
    InstanceId,
    Request,
    RequestId,
    RequestStatus,
    SamplingParams,
)

I0 = InstanceId(0)


def scheduler(num_blocks: int, block_size: int, budget: int, can_wait: bool = False,
              max_num_seqs: int = 8) -> Scheduler:
    rm = RManager(I0, num_blocks, block_size)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    return Scheduler(I0, config, rm, can_wait=can_wait)


def request(rid: str, prompt_len: int, arrival: int) -> Request:
    return Request(RequestId(rid), None, list(range(1, prompt_len + 1)), SamplingParams(),
                   arrival=arrival)


def plan_of(out: SchedulerOutput) -> list[tuple]:
    """(request, start_pos, num_tokens, block ids, sample) per chunk."""
    return [(c.request_id, c.start_pos, len(c.token_ids), [b for _, b in c.blocks], c.sample)
            for c in out.plan.chunks]


def advance(s: Scheduler, out: SchedulerOutput) -> None:
    by_id = {r.request_id: r for r in s.running}
    for chunk in out.plan.chunks:
        r = by_id[chunk.request_id]
        r.num_computed_tokens += len(chunk.token_ids)
        if chunk.sample:
            r.output_token_ids.append(7)


def test_chunked_prefill_then_decode_with_exact_blocks():
    s = scheduler(num_blocks=8, block_size=4, budget=8)
    a, b = request("a", 10, 0), request("b", 3, 1)
    s.add(a)
    s.add(b)
    out = s.schedule()  # a's first chunk takes the whole budget; b waits for the next step
    assert plan_of(out) == [("a", 0, 8, [0, 1], False)]
    assert [r.request_id for r in s.waiting] == ["b"]
    advance(s, out)
    out = s.schedule()  # a finishes its prompt and samples; b fits whole with a's headroom
    assert plan_of(out) == [("a", 8, 2, [0, 1, 2], True), ("b", 0, 3, [3], True)]
    advance(s, out)
    out = s.schedule()  # both decode one token; a's 11th position still fits in 3 blocks
    assert plan_of(out) == [("a", 10, 1, [0, 1, 2], True), ("b", 3, 1, [3], True)]
    assert out.plan.chunks[0].token_ids == [7]  # the token it sampled
    assert out.preempted == [] and out.ended == []
    s.rmanager.check_integrity()


def test_a_prompt_starts_only_when_its_whole_prefill_fits():
    """Admitted on its first chunk alone, a long prompt takes blocks it cannot finish with;
    several of them fill the pools half-prefilled and wait on each other for ever."""
    s = scheduler(num_blocks=8, block_size=4, budget=16)
    a, b = request("a", 20, 0), request("b", 20, 1)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert plan_of(out) == [("a", 0, 16, [0, 1, 2, 3], False)]
    advance(s, out)
    out = s.schedule()  # b needs 5 blocks + 1 of headroom for a; 3 are free: it waits
    assert plan_of(out) == [("a", 16, 4, [0, 1, 2, 3, 4], True)]
    assert s.rmanager.request_ids() == ["a"] and list(s.waiting) == [b]
    advance(s, out)
    s.finish(a)
    assert a.status is RequestStatus.FINISHED and s.rmanager.num_free_blocks == 8
    out = s.schedule()
    assert plan_of(out) == [("b", 0, 16, [0, 1, 2, 3], False)]


def test_a_request_that_needs_a_block_preempts_the_cheapest_of_itself_and_newer_ones():
    s = scheduler(num_blocks=4, block_size=2, budget=16)
    a, b = request("a", 3, 0), request("b", 1, 1)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert plan_of(out) == [("a", 0, 3, [0, 1], True), ("b", 0, 1, [2], True)]
    advance(s, out)
    out = s.schedule()
    assert plan_of(out) == [("a", 3, 1, [0, 1], True), ("b", 1, 1, [2], True)]
    advance(s, out)
    out = s.schedule()  # a takes the last free block; b needs one too and gives way
    assert plan_of(out) == [("a", 4, 1, [0, 1, 3], True)]
    assert out.preempted == [b] and list(s.waiting) == [b] and s.running == [a]
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1 and b.output_token_ids == [7, 7]
    assert b.status is RequestStatus.WAITING and s.num_preemptions == 1
    assert s.rmanager.request_ids() == ["a"] and s.rmanager.num_free_blocks == 1
    advance(s, out)
    out = s.schedule()  # b (3 tokens to recompute: 2 blocks + 1 headroom) cannot start yet
    assert plan_of(out) == [("a", 5, 1, [0, 1, 3], True)] and list(s.waiting) == [b]


def test_queued_blocks_is_a_running_total_of_the_queue():
    """Kept as requests join, start, are preempted (back first, with their output so far) and
    end while waiting; routing asks it for every instance on every new request."""
    s = scheduler(num_blocks=4, block_size=2, budget=16)
    a, b = request("a", 3, 0), request("b", 1, 1)
    s.add(a)  # 4 positions: 2 blocks
    s.add(b)  # 2 positions: 1 block
    assert s.queued_blocks() == s.recount_queued_blocks() == 3
    for _ in range(3):
        out = s.schedule()
        advance(s, out)
        assert s.queued_blocks() == s.recount_queued_blocks()
    assert out.preempted == [b] and b.num_tokens == 3  # 4 positions: 2 blocks
    assert s.queued_blocks() == s.recount_queued_blocks() == 2
    s.finish(b)  # ends while waiting
    assert s.queued_blocks() == s.recount_queued_blocks() == 0


def test_a_chunk_carries_the_table_itself_and_its_blocks_per_holder():
    s = scheduler(num_blocks=8, block_size=4, budget=16)
    a = request("a", 10, 0)
    s.add(a)
    (chunk,) = s.schedule().plan.chunks
    assert chunk.blocks is s.rmanager.block_view(a.request_id)  # a view for the step, no copy
    assert chunk.blocks == [(I0, 0), (I0, 1), (I0, 2)] and chunk.holders == {I0: 3}
    chunk.holders[I0] = 0  # the counts are the chunk's own copy
    assert s.rmanager.holder_counts(a.request_id) == {I0: 3}


def lone_request_outgrowing_the_pool(can_wait: bool) -> tuple[Scheduler, Request,
                                                              SchedulerOutput]:
    s = scheduler(num_blocks=2, block_size=2, budget=16, can_wait=can_wait)
    a = request("a", 3, 0)
    s.add(a)
    for expected in [("a", 0, 3, [0, 1], True), ("a", 3, 1, [0, 1], True)]:
        out = s.schedule()
        assert plan_of(out) == [expected]
        advance(s, out)
    return s, a, s.schedule()  # position 4 needs a third block


def test_without_lending_a_lone_request_that_outgrows_the_pool_ends():
    s, a, out = lone_request_outgrowing_the_pool(can_wait=False)
    assert out.plan.chunks == [] and out.ended == [a] and out.preempted == []
    assert a.finish_reason is FinishReason.LENGTH and a.status is RequestStatus.FINISHED
    assert s.running == [] and s.rmanager.num_free_blocks == 2


def test_with_lending_a_lone_request_that_finds_no_block_waits():
    s, a, out = lone_request_outgrowing_the_pool(can_wait=True)
    assert out.plan.chunks == [] and out.ended == [] and out.preempted == []
    assert s.running == [a] and a.finish_reason is None and a.num_computed_tokens == 4


def test_demand_of_the_queue_head():
    s = scheduler(num_blocks=8, block_size=4, budget=4)
    assert s.demand() == Demand(0, 0)
    a, b = request("a", 10, 0), request("b", 30, 1)
    s.add(a)  # 11 positions: 3 blocks
    s.add(b)  # 31 positions: 8 blocks
    # the head needs 3 blocks to start (10 prompt positions; nothing running: no headroom)
    assert s.demand() == Demand(keep_free=3, reclaim=0, head_blocks=3, head_tokens=10)
    assert s.queued_blocks() == 3 + 8
    s.finish(a)  # aborted while waiting
    assert s.demand() == Demand(keep_free=8, reclaim=0, head_blocks=8, head_tokens=30)
    s.rmanager.allocate_slots(RequestId("x"), 8)  # 6 free: the head borrows, keeps nothing
    assert s.demand() == Demand(keep_free=0, reclaim=0, head_blocks=8, head_tokens=30)


def test_demand_carries_the_batch_load_for_placement():
    s = scheduler(num_blocks=16, block_size=4, budget=64)
    a, b, c = request("a", 10, 0), request("b", 6, 1), request("c", 9, 2)
    for r in (a, b, c):
        s.add(r)
    s.schedule()  # all three start
    d = s.demand()
    assert (d.num_running, d.kv_tokens, d.longest, d.head_blocks) == (3, 25, "a", 0)
    s.finish(a)  # the longest is gone: nothing of it to move
    assert s.demand().longest is None and s.demand().num_running == 2


def test_choose_victim_is_cheapest_to_recompute_then_newest():
    old, mid, new = request("old", 5, 0), request("mid", 5, 1), request("new", 5, 2)
    old.num_computed_tokens, mid.num_computed_tokens, new.num_computed_tokens = 9, 3, 3
    assert choose_victim([old, mid, new]) is new
    new.num_computed_tokens = 4
    assert choose_victim([old, mid, new]) is mid
    assert choose_victim([old]) is old


@pytest.mark.parametrize("local_first", [False, True])
def test_local_first_admission_starts_a_request_only_where_it_fits(local_first):
    """Reactive admission counts what creditors may lend; local first (proactive placement)
    waits for local blocks, unless the request could never fit this pool."""
    gm = GManager()
    rms = [RManager(InstanceId(i), 4, 4, 4, gm) for i in (0, 1)]
    for rm in rms:
        gm.register(rm)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    s = Scheduler(InstanceId(0), config, rms[0], can_wait=True, local_first=local_first)
    assert rms[0].allocate_slots(RequestId("x"), 8)  # 2 of 4 local blocks taken
    s.add(request("mid", 12, 0))  # 3 blocks: fits the pool, not its 2 free blocks
    started = [c.request_id for c in s.schedule().plan.chunks]
    assert started == ([] if local_first else ["mid"])
    assert rms[1].num_free_blocks == (4 if local_first else 3)  # reactive borrowed one
    if local_first:
        rms[0].free(RequestId("x"))
        assert [c.request_id for c in s.schedule().plan.chunks] == ["mid"]  # now it fits
        # a request longer than any pool starts by borrowing, local first or not
        s1 = Scheduler(InstanceId(1), config, rms[1], can_wait=True, local_first=True)
        s1.add(request("huge", 20, 1))  # 5 blocks against pools of 4
        gm.heartbeat_all()
        assert [c.request_id for c in s1.schedule().plan.chunks] == ["huge"]
        assert rms[1].holder_counts(RequestId("huge")) == {InstanceId(1): 4, InstanceId(0): 1}
