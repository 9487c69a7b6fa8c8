"""The rebalancer's request-level decisions: standstills and lost instances."""

from __future__ import annotations

from infinillm.cluster import GManager, InstanceView, Rebalancer, RManager
from infinillm.types import BlockMove, InstanceId, Request, RequestId, SamplingParams

A, B, C = InstanceId(0), InstanceId(1), InstanceId(2)


def request(rid: str, arrival: int, computed: int) -> Request:
    r = Request(RequestId(rid), None, [1] * 8, SamplingParams(), arrival=arrival)
    r.num_computed_tokens = computed
    return r


def test_standstill_preempts_by_the_victim_policy_and_ends_a_lone_request():
    rb = Rebalancer(None, 16, 0)
    old, new = request("old", 0, 8), request("new", 1, 8)
    views = [InstanceView(A, [new], []), InstanceView(B, [old], [])]
    assert rb.settle(views, [], standstill=False).preempt == []
    settled = rb.settle(views, [], standstill=True)
    assert settled.preempt == [new] and settled.end == []  # same cost: the newest gives way
    old.num_computed_tokens = 2
    assert rb.settle(views, [], standstill=True).preempt == [old]  # cheaper to recompute
    lone = rb.settle([InstanceView(A, [old], []), InstanceView(B, [], [new])], [], True)
    assert lone.end == [old] and lone.preempt == []
    assert rb.settle([InstanceView(A, [], [old])], [], True).end == []  # nothing runs
    assert rb.num_standstills == 3


def test_a_lost_instance_orphans_its_requests_and_preempts_those_with_blocks_on_it():
    gm = GManager()
    rms = [RManager(i, 4, 4, 4, gm) for i in (A, B, C)]
    for rm in rms:
        gm.register(rm)
    a, b, c = rms
    assert a.allocate_slots(RequestId("on_b"), 24)  # 4 local + 2 on b (most lendable: b)
    assert c.allocate_slots(RequestId("home"), 4)
    assert b.allocate_slots(RequestId("b_run"), 4)
    on_b, home, b_run = request("on_b", 0, 20), request("home", 1, 3), request("b_run", 2, 3)
    b_wait = request("b_wait", 3, 0)
    views = [InstanceView(A, [on_b], []), InstanceView(B, [b_run], [b_wait]),
             InstanceView(C, [home], [])]
    settled = Rebalancer(gm, 16, 0).settle(views, [B], standstill=True)
    assert settled.orphans == [b_run, b_wait]
    assert settled.preempt == [on_b]  # home's blocks are all on c
    assert settled.end == [] and settled.lost == [B]  # a loss is settled before standstills


def test_requests_of_a_cancelled_swap_are_recomputed_when_the_loss_is_settled():
    """A swap writes over blocks in use (each move's destination is the other's source): once
    cancelled, neither placement can be trusted, whichever of its writes were done."""
    gm = GManager()
    rms = [RManager(i, 4, 4, 4, gm) for i in (A, B, C)]
    for rm in rms:
        gm.register(rm)
    for rm, rid in zip(rms, ("ra", "rb", "rc")):
        assert rm.allocate_slots(RequestId(rid), 4)
    ra, rb, rc = request("ra", 0, 4), request("rb", 1, 4), request("rc", 2, 4)
    views = [InstanceView(A, [ra], []), InstanceView(B, [rb], []), InstanceView(C, [rc], [])]
    rebalancer = Rebalancer(gm, 16, 0)
    swap = [BlockMove(RequestId("ra"), A, 0, (B, 1), (A, 1)),
            BlockMove(RequestId("rb"), B, 0, (A, 1), (B, 1))]
    rebalancer.cancel(swap)
    gm.check_integrity()  # nothing was reserved for a swap, so nothing is released
    settled = rebalancer.settle(views, [C], standstill=False)
    assert settled.orphans == [rc] and settled.preempt == [ra, rb]
    assert rebalancer.settle(views[:2], [C], standstill=False).preempt == []  # settled once
