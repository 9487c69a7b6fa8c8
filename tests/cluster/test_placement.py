"""Proactive placement's decisions, as exact ledger state: which blocks move where, what is
reserved, what is refused."""

from __future__ import annotations

from infinillm.cluster import Demand, GManager, Placement, RManager, StepFeatures, StepTimeModel
from infinillm.types import InstanceId, RequestId

A, B, C = InstanceId(0), InstanceId(1), InstanceId(2)
BLOCK = 4


def cluster(num_blocks: int = 10) -> tuple[GManager, list[RManager]]:
    gm = GManager()
    rms = [RManager(i, num_blocks, BLOCK, num_blocks, gm) for i in (A, B, C)]
    for rm in rms:
        gm.register(rm)
    return gm, rms


def fitted(exchange_s: float) -> StepTimeModel:
    """A model fitted on steps of a 10 ms weights pass, attention at 10M KV tokens/s, and
    `exchange_s` per remote holder."""
    model = StepTimeModel(min_records=4)
    for n in (1, 2, 4, 8, 16):
        for kv in (0, 1000, 5000):
            for h in (0, 1, 2):
                model.observe(StepFeatures(n, kv, 0.0, h), 0.010 + 1e-7 * kv + exchange_s * h)
    model.fit()
    return model


def test_a_debtor_moves_its_longest_requests_oldest_blocks_to_the_roomiest_creditor():
    gm, (a, b, c) = cluster()
    assert a.allocate_slots(RequestId("long"), 8 * BLOCK)  # 8 of a's 10 blocks
    assert c.allocate_slots(RequestId("c_run"), 6 * BLOCK)  # c: 4 free, b: 10 free
    demands = {A: Demand(head_blocks=5, head_tokens=16, num_running=1, kv_tokens=32,
                         longest=RequestId("long")),
               B: Demand(), C: Demand(num_running=1, kv_tokens=24, longest=RequestId("c_run"))}
    gm.heartbeat_all()
    planned: set = set()
    moves = Placement(gm, {}, BLOCK).plan(demands, budget=16, planned=planned)
    # a has 2 free and its head needs 5: 3 blocks go, the oldest, to b (the most room)
    assert [(m.request_id, m.index, m.src[0], m.dst[0]) for m in moves] == [
        ("long", 0, A, B), ("long", 1, A, B), ("long", 2, A, B)]
    assert planned == {(RequestId("long"), i) for i in range(3)}
    # destinations are reserved on b at once (lent to a), nothing switched yet
    assert b.num_free_blocks == 7 and b.lent_blocks() == {(A, RequestId("long")): 3}
    assert a.holder_counts(RequestId("long")) == {A: 8}
    gm.apply_moves(moves)
    assert a.holder_counts(RequestId("long")) == {A: 5, B: 3} and a.num_free_blocks == 5
    gm.check_integrity()


def test_the_budget_caps_a_round_and_the_last_block_never_moves():
    gm, (a, b, c) = cluster()
    assert a.allocate_slots(RequestId("long"), 3 * BLOCK - 1)  # 3 blocks, the last not full
    demands = {A: Demand(head_blocks=10, num_running=1, kv_tokens=11, longest="long"),
               B: Demand(), C: Demand()}
    moves = Placement(gm, {}, BLOCK).plan(demands, budget=16, planned=set())
    assert [m.index for m in moves] == [0, 1]  # block 2 is still being written
    gm.cancel_moves(moves)
    one = Placement(gm, {}, BLOCK).plan(demands, budget=1, planned=set())
    assert [m.index for m in one] == [0]
    gm.cancel_moves(one)
    assert b.num_free_blocks + c.num_free_blocks == 20
    gm.check_integrity()


def test_no_creditor_no_move_and_a_queue_makes_no_creditor():
    gm, (a, b, c) = cluster(num_blocks=6)
    assert a.allocate_slots(RequestId("long"), 6 * BLOCK)
    assert b.allocate_slots(RequestId("b_run"), 6 * BLOCK)
    demands = {A: Demand(head_blocks=3, num_running=1, kv_tokens=24, longest="long"),
               B: Demand(num_running=1, kv_tokens=24),
               C: Demand(head_blocks=7)}  # c is empty but has a queue of its own
    assert Placement(gm, {}, BLOCK).plan(demands, 16, set()) == []
    assert c.num_free_blocks == 6 and gm.debts == {}


def test_lent_blocks_go_home_first_when_the_owner_has_room():
    gm, (a, b, c) = cluster(num_blocks=4)
    assert b.allocate_slots(RequestId("tmp"), 4 * BLOCK)
    assert b.allocate_slots(RequestId("b_long"), 2 * BLOCK)  # both lent by a
    assert b.holder_counts(RequestId("b_long")) == {A: 2}
    b.free(RequestId("tmp"))  # b has room again; a's queue head needs all of a's blocks
    demands = {A: Demand(head_blocks=4, head_tokens=16), B: Demand(num_running=1),
               C: Demand(head_blocks=9)}
    moves = Placement(gm, {}, BLOCK).plan(demands, 16, set())
    assert [(m.request_id, m.index, m.src[0], m.dst[0]) for m in moves] == [
        ("b_long", 0, A, B), ("b_long", 1, A, B)]
    gm.apply_moves(moves)
    assert b.holder_counts(RequestId("b_long")) == {B: 2} and gm.debts == {}
    gm.check_integrity()


def test_the_models_veto_a_move_that_loses_throughput():
    gm, (a, b, c) = cluster()
    assert a.allocate_slots(RequestId("long"), 8 * BLOCK)
    demands = {A: Demand(head_blocks=5, head_tokens=4, num_running=1, kv_tokens=32,
                         longest="long"),
               B: Demand(), C: Demand(head_blocks=99)}
    # over a slow link the exchange the moved request would pay every step (0.5 s) costs
    # more than one more request in a's batch gains
    slow = Placement(gm, {i: fitted(0.5) for i in (A, B, C)}, BLOCK)
    assert slow.plan(demands, 16, set()) == [] and slow.num_refused == 1
    assert b.num_free_blocks == 10  # nothing reserved
    fast = Placement(gm, {i: fitted(1e-4) for i in (A, B, C)}, BLOCK)
    moves = fast.plan(demands, 16, set())
    assert [(m.index, m.dst[0]) for m in moves] == [(0, B), (1, B), (2, B)]
    assert fast.num_refused == 0
    gm.cancel_moves(moves)
    assert b.num_free_blocks == 10

