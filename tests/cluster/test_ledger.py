"""The control plane alone: GManager + RManagers + Rebalancer, exact block ids, refusals,
conservation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinillm.cluster import Demand, GManager, Rebalancer, RManager
from infinillm.kvcache import blocks_needed
from infinillm.types import InstanceId, RequestId

A, B, C = InstanceId(0), InstanceId(1), InstanceId(2)


def cluster(num_instances: int, num_blocks: int, block_size: int = 4,
            cap: int | None = None) -> tuple[GManager, list[RManager]]:
    gm = GManager()
    rms = [RManager(InstanceId(i), num_blocks, block_size,
                    num_blocks if cap is None else cap, gm) for i in range(num_instances)]
    for rm in rms:
        gm.register(rm)
    return gm, rms


def plan_recall(gm: GManager, max_moves: int, reclaim: dict[InstanceId, int] | None = None,
                headroom: int = 0):
    """The rebalancer's block moves, with no queue keeping blocks back."""
    demands = {i: Demand(0, (reclaim or {}).get(i, 0)) for i in gm.rmanagers}
    return Rebalancer(gm, 16, headroom).plan_moves(demands, max_moves)


def entries(rm: RManager, rid: str) -> list[tuple[int, int]]:
    return rm.block_locations(RequestId(rid))


def test_borrow_from_the_most_free_creditor_with_exact_ids():
    gm, (a, b, c) = cluster(3, 4)
    assert c.allocate_slots(RequestId("c1"), 4)  # c: 3 free, b: 4 free
    gm.heartbeat_all()
    assert a.allocate_slots(RequestId("r"), 24)  # 6 blocks: 4 local + 2 from b
    assert entries(a, "r") == [(A, 0), (A, 1), (A, 2), (A, 3), (B, 0), (B, 1)]
    assert gm.debts == {(A, B): {RequestId("r"): 2}}
    assert b.num_lent_blocks == 2 and a.num_borrowed_blocks() == 2
    # growing again prefers the creditor that already holds this request's blocks
    gm.heartbeat_all()
    assert a.allocate_slots(RequestId("r"), 28)
    assert entries(a, "r")[-1] == (B, 2)
    gm.check_integrity()
    a.free(RequestId("r"))
    c.free(RequestId("c1"))
    assert gm.debts == {} and [rm.num_free_blocks for rm in (a, b, c)] == [4, 4, 4]
    gm.check_integrity()


def test_borrowed_blocks_and_remote_entries_are_kept_as_tables_change():
    """The owner's counts of blocks held elsewhere follow borrowing, moves and frees; remote
    entries come in table order (tables in the order they were made), whatever the order in
    which they got remote blocks."""
    gm, (a, _) = cluster(2, 6)
    r1, r2 = RequestId("r1"), RequestId("r2")
    assert a.allocate_slots(r1, 8)  # A0, A1
    assert a.allocate_slots(r2, 24)  # A2..A5, then B0, B1 borrowed
    gm.heartbeat_all()
    assert a.allocate_slots(r1, 12)  # r1 borrows B2 after r2 did, but its table is older
    assert list(a.remote_entries()) == [(r1, 2, (B, 2)), (r2, 4, (B, 0)), (r2, 5, (B, 1))]
    assert list(a.remote_entries(B)) == list(a.remote_entries())
    assert list(a.remote_entries(C)) == [] and a.num_borrowed_blocks() == 3
    a.free(r1)
    assert a.num_borrowed_blocks() == 2
    assert list(a.remote_entries()) == [(r2, 4, (B, 0)), (r2, 5, (B, 1))]
    gm.apply_moves([gm.plan_move(A, r2, 4, A)])  # home to A0
    assert a.num_borrowed_blocks() == 1 and list(a.remote_entries()) == [(r2, 5, (B, 1))]
    gm.apply_moves([gm.plan_move(A, r2, 0, B)])  # A2 out to B0
    assert a.num_borrowed_blocks() == 2
    assert list(a.remote_entries()) == [(r2, 0, (B, 0)), (r2, 5, (B, 1))]
    gm.check_integrity()
    a._num_borrowed += 1  # corrupt the counter: the check recounts the tables
    with pytest.raises(RuntimeError, match="2 blocks borrowed, counter says 3"):
        gm.check_integrity()


def test_creditor_refuses_what_it_cannot_serve_and_nothing_is_taken():
    gm, (a, b) = cluster(2, 4)
    assert b.lend(RequestId("x"), 5, A) is None  # more than the pool
    assert b.allocate_slots(RequestId("b1"), 12)  # b uses 3 blocks; the view still says 4 free
    assert a.allocate_slots(RequestId("r"), 16)  # a's own 4 blocks
    assert not a.allocate_slots(RequestId("r"), 28)  # reserve 3 on b by the stale view; b refuses
    assert gm.num_refused_loans == 1
    assert entries(a, "r") == [(A, i) for i in range(4)]
    assert b.num_free_blocks == 1 and gm.debts == {}
    gm.check_integrity()
    # after the refusal the view is fresh: one block can be borrowed, two cannot
    assert not a.allocate_slots(RequestId("r"), 24)
    assert a.allocate_slots(RequestId("r"), 20)
    gm.check_integrity()


def test_lending_cap_holds():
    gm, (a, b) = cluster(2, 8, cap=3)
    assert a.allocate_slots(RequestId("r"), 32)  # a's whole pool
    assert not a.allocate_slots(RequestId("r"), 48)  # 4 more: over b's cap of 3
    assert a.allocate_slots(RequestId("r"), 44)  # 3 more: at the cap
    assert b.num_lent_blocks == 3 and b.num_lendable_blocks() == 0
    assert b.lend(RequestId("y"), 1, A) is None
    assert b.allocate_slots(RequestId("b1"), 20)  # b's own requests still use its free blocks
    gm.check_integrity()


def test_no_chained_borrowing():
    """A creditor lends from its own pool only: with all free blocks on a debtor's creditor
    used up, the debtor gets nothing even if a third instance could have served the creditor."""
    gm, (a, b) = cluster(2, 2)
    assert a.allocate_slots(RequestId("r"), 16)  # 2 local + 2 borrowed from b
    gm.heartbeat_all()
    assert not b.allocate_slots(RequestId("s"), 4)  # b is empty and a has nothing to lend
    gm.check_integrity()


def apply(gm: GManager, moves) -> None:
    """Control-plane half of a move (the data plane is not part of these tests)."""
    gm.apply_moves(moves)
    gm.check_integrity()


def test_recall_swaps_a_cycle():
    gm, (a, b) = cluster(2, 4)
    big, tmp, other = RequestId("big"), RequestId("tmp"), RequestId("other")
    assert a.allocate_slots(big, 8) and a.allocate_slots(tmp, 8)  # a: big 0,1; tmp 2,3
    gm.heartbeat_all()
    assert a.allocate_slots(big, 12)  # a is full: big borrows b's block 0
    a.free(tmp)
    assert b.allocate_slots(other, 12)  # b: blocks 1, 2, 3
    gm.heartbeat_all()
    assert b.allocate_slots(other, 20)  # b is full: other borrows a's blocks 2, 3
    assert gm.debt_matrix() == {(A, B): 1, (B, A): 2}
    moves = plan_recall(gm, 16)
    # one swap: big's block on b <-> other's first block on a; nobody has room for more
    assert [(m.request_id, m.index, m.src, m.dst) for m in moves] == [
        (big, 2, (B, 0), (A, 2)),
        (other, 3, (A, 2), (B, 0)),
    ]
    apply(gm, moves)
    assert a.block_locations(big) == [(A, 0), (A, 1), (A, 2)]
    assert b.block_locations(other) == [(B, 1), (B, 2), (B, 3), (B, 0), (A, 3)]
    assert gm.debts == {(B, A): {other: 1}}


def test_recall_brings_blocks_home_within_budget_and_headroom():
    gm, (a, b) = cluster(2, 4)
    r, tmp = RequestId("r"), RequestId("tmp")
    assert a.allocate_slots(tmp, 8) and a.allocate_slots(r, 8)  # tmp 0,1; r 2,3
    gm.heartbeat_all()
    assert a.allocate_slots(r, 20)  # r borrows b's 0, 1, 2
    a.free(tmp)  # a has 2 free; with a headroom of 1, one block may come home
    assert plan_recall(gm, 0, headroom=1) == []
    moves = plan_recall(gm, 16, headroom=1)
    assert [(m.index, m.src, m.dst) for m in moves] == [(2, (B, 0), (A, 0))]
    apply(gm, moves)
    assert a.block_locations(r) == [(A, 2), (A, 3), (A, 0), (B, 1), (B, 2)]
    assert b.num_free_blocks == 2 and gm.debts == {(A, B): {r: 2}}
    # the migration primitive moves a block anywhere it fits, here from b to a's last free one
    move = gm.plan_move(A, r, 4, A)
    apply(gm, [move])
    assert a.block_locations(r)[4] == (A, 1)
    assert gm.plan_move(A, r, 4, A) is None  # already there


def test_creditor_reclaims_lent_blocks_for_its_own_queue():
    gm, (a, b, c) = cluster(3, 4)
    r = RequestId("r")
    assert b.allocate_slots(r, 24)  # 4 on b, then 2 borrowed from a (ties: lowest id)
    assert b.block_locations(r)[4:] == [(A, 0), (A, 1)]
    gm.heartbeat_all()
    assert plan_recall(gm, 16) == []  # nobody wants anything back
    moves = plan_recall(gm, 16, {A: 2})  # a's own queue needs the two blocks it lent
    # b is full, so they go to c, which has the most room; never back to a
    assert [(m.index, m.src, m.dst) for m in moves] == [(4, (A, 0), (C, 0)), (5, (A, 1), (C, 1))]
    apply(gm, moves)
    assert a.num_free_blocks == 4 and a.num_lent_blocks == 0 and c.num_lent_blocks == 2
    assert gm.debts == {(B, C): {r: 2}}


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "grow", "finish", "recall", "migrate"]),
                          st.integers(0, 2), st.integers(0, 5), st.integers(1, 20)),
                max_size=50),
       st.integers(0, 6))
def test_conservation_under_random_operations(ops, cap):
    gm, rms = cluster(3, 6, block_size=4, cap=cap)
    lengths: dict[RequestId, int] = {}
    owner_of: dict[RequestId, RManager] = {}
    for op, inst, who, n in ops:
        rid = RequestId(f"r{who}")
        rm = owner_of.get(rid, rms[inst])
        if op == "grow":
            before = [x.num_free_blocks for x in rms]
            if rm.allocate_slots(rid, lengths.get(rid, 0) + n):
                lengths[rid] = lengths.get(rid, 0) + n
                owner_of[rid] = rm
            else:
                assert [x.num_free_blocks for x in rms] == before  # all or nothing
        elif op == "finish":
            rm.free(rid)
            lengths.pop(rid, None)
            owner_of.pop(rid, None)
        elif op == "recall":
            # sometimes a creditor wants blocks back
            gm.apply_moves(plan_recall(gm, n, {InstanceId(inst): who}, headroom=1))
        elif rid in lengths:  # migrate logical block n of rid to instance inst
            index = n % len(rm.block_locations(rid))
            move = gm.plan_move(rm.instance_id, rid, index, InstanceId(inst))
            if move is not None:
                gm.apply_moves([move])
        gm.heartbeat_all()
        gm.check_integrity()
        for r, length in lengths.items():
            assert len(owner_of[r].block_locations(r)) == blocks_needed(length, 4)
        assert sum(x.num_lent_blocks for x in rms) == sum(
            x.num_borrowed_blocks() for x in rms)
        assert all(x.num_lent_blocks <= cap for x in rms)
    for rid, rm in list(owner_of.items()):
        rm.free(rid)
    assert [x.num_free_blocks for x in rms] == [6, 6, 6] and gm.debts == {}
    gm.check_integrity()
