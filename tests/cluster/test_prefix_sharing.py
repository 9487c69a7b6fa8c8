"""Prefix cache hits across instances at the control plane: shared references in the ledger,
pinned blocks, conservation."""

from __future__ import annotations

import pytest

from infinillm.cluster import Demand, GManager, Rebalancer, RManager
from infinillm.kvcache.prefix import block_keys
from infinillm.types import InstanceId, RequestId

A, B = InstanceId(0), InstanceId(1)
R1, R2, R3 = RequestId("r1"), RequestId("r2"), RequestId("r3")
TOKENS = list(range(100, 112))  # three blocks of 4


def cluster(num_blocks: int = 6) -> tuple[GManager, RManager, RManager]:
    gm = GManager()
    a, b = (RManager(i, num_blocks, 4, num_blocks, gm) for i in (A, B))
    gm.register(a)
    gm.register(b)
    return gm, a, b


def computed(rm: RManager, rid: RequestId, tokens: list[int]) -> list[bytes]:
    """A request that computed `tokens` and published its full blocks."""
    keys = block_keys(tokens, 4, [])
    assert rm.allocate_slots(rid, len(tokens))
    rm.publish(rid, keys, len(keys))
    return keys


def test_a_hit_on_another_instance_is_a_shared_reference_in_the_ledger():
    gm, a, b = cluster()
    keys = computed(a, R1, TOKENS)
    assert b.take_cached(R2, keys[:2]) == 2
    assert b.block_locations(R2) == [(A, 0), (A, 1)]
    assert gm.debts == {(B, A): {R2: 2}} and a.num_lent_blocks == 0
    assert b.allocate_slots(R2, 12)  # the rest in its own pool
    assert b.block_locations(R2) == [(A, 0), (A, 1), (B, 0)]
    gm.check_integrity()
    # shared or taken from the cache: never moved (recall would bring them home otherwise)
    assert gm.plan_move(B, R2, 0, B) is None
    assert Rebalancer(gm, 16, 0).plan_moves({A: Demand(), B: Demand()}) == []
    a.free(R1)  # the writer ends; the reader still reads in place
    assert a.num_free_blocks == 6 - 2 and a.num_evictable_blocks == 1
    gm.check_integrity()
    b.free(R2)
    assert gm.debts == {} and a.num_free_blocks == b.num_free_blocks == 6
    assert a.num_cached_blocks == 3 and a.num_evictable_blocks == 3
    gm.check_integrity()


def test_the_longest_prefix_may_span_instances_and_stops_at_the_first_miss():
    gm, a, b = cluster()
    keys = computed(a, R1, TOKENS[:8])
    longer = block_keys(TOKENS + [1, 2, 3, 4], 4, [])
    assert b.allocate_slots(R2, 16)  # blocks 0-3 of R2 on b; only block 2 published
    b.publish(R2, longer, 0)
    b._pool.publish(b.block_locations(R2)[2][1], longer[2])  # as if R2 computed block 2 only
    assert keys == longer[:2]
    assert b.take_cached(R3, longer) == 3
    assert b.block_locations(R3) == [(A, 0), (A, 1), (B, 2)]
    gm.check_integrity()
    for rm, rid in ((a, R1), (b, R2), (b, R3)):
        rm.free(rid)
    gm.check_integrity()


def test_a_debtor_freed_while_sharing_and_a_failed_start_leave_no_reference():
    gm, a, b = cluster(num_blocks=4)
    keys = computed(a, R1, TOKENS)
    a.free(R1)
    assert b.take_cached(R2, keys) == 3
    assert a.num_free_blocks == 1  # the three cached blocks are referenced now
    b.free(R2)  # e.g. the allocation of its rest failed, or it was preempted or aborted
    assert gm.debts == {} and a.num_free_blocks == 4 and a.num_evictable_blocks == 3
    gm.check_integrity()


def test_integrity_catches_a_table_entry_without_its_reference():
    gm, a, b = cluster()
    keys = computed(a, R1, TOKENS)
    b.take_cached(R2, keys[:1])
    a._pool._sharers[0].clear()  # corrupt: R2's reference to a's block 0 forgotten
    del a._pool._sharers[0]
    with pytest.raises(RuntimeError):
        gm.check_integrity()


def test_a_cancelled_swap_takes_its_possibly_overwritten_blocks_out_of_the_cache():
    gm, a, b = cluster(num_blocks=3)
    r4 = RequestId("r4")
    assert a.allocate_slots(R1, 8) and a.allocate_slots(R3, 4)
    assert a.allocate_slots(R1, 12)  # R1's block 2 borrowed on b (its block 0)
    a.free(R3)
    assert b.allocate_slots(R2, 4) and b.allocate_slots(r4, 4)
    assert b.allocate_slots(R2, 8)  # R2's block 1 borrowed on a (its block 2)
    keys_a, keys_b = block_keys(TOKENS, 4, []), block_keys(list(range(200, 208)), 4, [])
    a.publish(R1, keys_a, 3)
    b.publish(R2, keys_b, 2)  # the borrowed blocks enter their holders' index
    rb = Rebalancer(gm, 16, 0)
    moves = rb.plan_moves({A: Demand(), B: Demand()})
    assert sorted((m.request_id, m.src, m.dst) for m in moves) == [
        (R1, (B, 0), (A, 2)), (R2, (A, 2), (B, 0))]  # a swap: both pools are full
    rb.cancel(moves)  # an instance lost during the copy: either block may be overwritten
    gm.check_integrity()
    for rm, rid in ((a, R1), (b, R2), (b, r4)):  # preempted when the loss is settled
        rm.free(rid)
    gm.check_integrity()
    assert b.take_cached(R3, keys_a) == 2  # R1's third block no longer names its K/V
    assert a.take_cached(R3, keys_b) == 1  # nor R2's second
    for rm in (a, b):
        rm.free(R3)
    assert a.num_free_blocks == b.num_free_blocks == 3
    assert a.num_cached_blocks == 2 and b.num_cached_blocks == 1
    gm.check_integrity()


def test_a_lent_block_shared_at_home_is_no_loan_once_its_borrower_ends():
    gm = GManager()
    a, b = RManager(A, 2, 4, 2, gm), RManager(B, 2, 4, 1, gm)
    gm.register(a)
    gm.register(b)
    keys = block_keys(TOKENS, 4, [])
    assert a.allocate_slots(R1, 12)  # R1's block 2 borrowed on b, at b's lending cap
    a.publish(R1, keys, 3)
    assert b.num_lent_blocks == 1
    assert b.take_cached(R2, keys) == 3  # b's request shares R1's blocks, the lent one too
    gm.check_integrity()
    a.free(R1)
    assert b.num_lent_blocks == 0  # b's own request holds its block now
    gm.check_integrity()
    gm.heartbeat_all()
    assert a.allocate_slots(R3, 4)  # a's blocks are R2's; b may lend again up to its cap
    assert b.block_locations(R2)[2] == (B, 0) and a.block_locations(R3) == [(B, 1)]
    gm.check_integrity()
    for rm, rid in ((a, R3), (b, R2)):
        rm.free(rid)
    gm.check_integrity()


def test_a_recalled_cached_block_takes_its_key_home():
    gm, a, b = cluster(num_blocks=3)
    assert a.allocate_slots(R1, 8) and a.allocate_slots(R3, 4)
    assert a.allocate_slots(R1, 12)  # R1's block 2 borrowed on b (its block 0)
    keys = block_keys(TOKENS, 4, [])
    a.publish(R1, keys, 3)
    a.free(R3)  # room at home
    rb = Rebalancer(gm, 16, 0)
    moves = rb.plan_moves({A: Demand(), B: Demand()})
    assert [(m.request_id, m.src, m.dst) for m in moves] == [(R1, (B, 0), (A, 2))]
    rb.commit(moves)
    gm.check_integrity()
    assert a.lookup(keys[2]) == 2 and b.lookup(keys[2]) is None
    assert b.num_free_blocks == 3 and b.num_cached_blocks == 0  # the remote copy is free
    assert b.take_cached(R2, keys) == 3
    assert b.block_locations(R2) == [(A, 0), (A, 1), (A, 2)]  # the home copy, shared
    gm.check_integrity()
    for rm, rid in ((a, R1), (b, R2)):
        rm.free(rid)
    assert a.num_free_blocks == b.num_free_blocks == 3 and a.num_cached_blocks == 3
    gm.check_integrity()
