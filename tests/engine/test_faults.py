"""An instance lost at every point of a step (runtime/faults.py), with the in-process executor.

Each case runs a batch whose requests borrow blocks across two instances and makes one instance
fail at one point: before or during a layer's exchange, while blocks move (a migration, the
rebalancer's recall), between sampling and the engine's update. Nothing of the failed step or
move may be applied: every request ends with the greedy tokens of one instance holding
everything (recomputed where needed), or, where the smaller cluster cannot hold it, with
finish reason "length". The integrity check runs after every step, and every surviving pool is
full at the end.
"""

from __future__ import annotations

import pytest
import torch

from infinillm import LLM, SamplingParams
from infinillm.runtime.faults import FaultPlan
from infinillm.types import BlockMove, InstanceId

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SETTINGS = dict(block_size=4, kv_blocks_per_instance=14, num_instances=2,
                max_num_batched_tokens=16)
# Each fits one pool (the survivor's), but together they make both instances borrow: request
# "3" borrows from instance 1, and its blocks are recalled home once others finish.
LENGTHS = (44, 30, 20, 25)


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=512)

    def run(batch: list[list[int]]) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]

    return run


class MoveLog:
    """Records the block moves the executor is asked to copy, then copies them."""

    def __init__(self, executor) -> None:
        self.calls: list[list[BlockMove]] = []
        self._move_blocks = executor.move_blocks
        executor.move_blocks = self

    def __call__(self, moves: list[BlockMove]) -> float:
        self.calls.append(list(moves))
        return self._move_blocks(moves)


def finish(engine, ids, done: dict, max_steps: int = 500) -> None:
    """Step until every request ended, checking the integrity after every step."""
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
    assert not engine.has_unfinished_requests(), f"requests did not end in {max_steps} steps"
    assert sorted(done) == sorted(ids)


def assert_lost(llm: LLM, lost: InstanceId) -> None:
    """The lost instance is gone from the engine, the ledger and the executor; the survivors'
    pools are full and nobody owes anything."""
    engine = llm.engine
    survivors = [i for i in range(SETTINGS["num_instances"]) if i != lost]
    assert [i.instance_id for i in engine.instances] == survivors
    assert sorted(engine.gmanager.rmanagers) == survivors
    assert sorted(engine.executor.workers) == survivors
    assert sorted(engine.executor.fabric.storages) == survivors
    assert engine.num_free_blocks() == [engine.num_blocks_per_instance] * len(survivors)
    assert engine.cluster_stats()["debts"] == []


# (point, instance, hit): hit 5 of an exchange point is the second step with remote blocks, at
# its middle layer (3 layers), after layer 0 wrote K/V on both sides; hit 7 of "sample" is the
# step after the first loans, mid-generation.
STEP_POINTS = [
    ("exchange.before", 0, 5),  # the borrower
    ("exchange.before", 1, 5),  # the lender
    ("exchange.during", 0, 5),
    ("exchange.during", 1, 5),
    ("sample", 0, 7),
    ("sample", 1, 7),
    ("move", 0, 2),  # the recall home to 0: its second block's write
    ("move", 1, 1),  # the same recall, read from 1
]


@pytest.mark.parametrize("point, lost, hit", STEP_POINTS,
                         ids=[f"{p}-{i}" for p, i, _ in STEP_POINTS])
def test_an_instance_lost_in_a_step_loses_no_token(tiny_llama, reference, point, lost, hit):
    batch = prompts(2, LENGTHS)
    llm = LLM(tiny_llama, **SETTINGS)
    engine = llm.engine
    plan = FaultPlan(point, InstanceId(lost), hit)
    engine.executor.set_fault(plan)
    moves = MoveLog(engine.executor)
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    finish(engine, ids, done)
    assert plan.fired
    if point == "move":  # the moves that failed were the rebalancer's recall home to 0
        assert moves.calls and all(m.dst[0] == m.owner == 0 for m in moves.calls[0])
    assert [done[i].outputs[0].token_ids for i in ids] == reference(batch)
    assert_lost(llm, InstanceId(lost))


@pytest.mark.parametrize("lost", [0, 1], ids=["destination", "source"])
def test_an_instance_lost_in_a_migration_loses_no_token(tiny_llama, reference, lost):
    batch = prompts(2, LENGTHS)
    llm = LLM(tiny_llama, **SETTINGS)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    for _ in range(3):  # prompts in flight, each request on its own instance
        done.update({o.request_id: o for o in engine.step() if o.finished})
    owner = engine.streams[ids[1]].request.instance_id
    assert owner == 1 and engine.block_locations(ids[1])[0][0] == 1
    plan = FaultPlan("move", InstanceId(lost))
    engine.executor.set_fault(plan)
    assert not engine.migrate_block(ids[1], 0, InstanceId(0))
    assert plan.fired
    engine.check_integrity()
    finish(engine, ids, done)
    assert [done[i].outputs[0].token_ids for i in ids] == reference(batch)
    assert_lost(llm, InstanceId(lost))


def test_a_request_the_survivor_cannot_hold_ends_with_length(tiny_llama, reference):
    """A request longer than one pool needs both instances: once one is lost it ends with
    finish reason "length" and the tokens it had; the others complete exactly."""
    batch = prompts(3, (70, 9, 12))  # 70 tokens: 18 blocks of 4, more than one pool of 14
    llm = LLM(tiny_llama, **SETTINGS)
    engine = llm.engine
    plan = FaultPlan("exchange.during", InstanceId(1), hit=4)
    engine.executor.set_fault(plan)
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    finish(engine, ids, done)
    assert plan.fired
    expected = reference(batch)
    long_out = done[ids[0]].outputs[0]
    assert long_out.finish_reason == "length"
    assert long_out.token_ids == expected[0][: len(long_out.token_ids)]
    assert [done[i].outputs[0].token_ids for i in ids[1:]] == expected[1:]
    assert_lost(llm, InstanceId(1))


def test_a_loss_during_a_swap_recomputes_the_swapped_requests(tiny_llama, reference):
    """Three instances: 0 and 1 hold a block of each other's request, so the rebalancer swaps
    them (each move's destination is the other's source, overwritten in place), and in the same
    moves brings a block of instance 2's request home. Instance 2 is lost before its move is
    written, after the swap was: the swapped blocks hold neither the old nor a committed
    placement, so their requests must be recomputed, not read."""
    batch = prompts(4, (13, 14, 15))
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=14, num_instances=3,
              max_num_batched_tokens=48)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    engine.step()  # every prompt prefilled, each request on its own instance
    assert [engine.streams[i].request.instance_id for i in ids] == [0, 1, 2]
    assert engine.migrate_block(ids[0], 0, InstanceId(1))
    assert engine.migrate_block(ids[1], 0, InstanceId(0))
    assert engine.migrate_block(ids[2], 0, InstanceId(0))
    plan = FaultPlan("move", InstanceId(2))
    engine.executor.set_fault(plan)
    moves = MoveLog(engine.executor)
    finish(engine, ids, done)
    assert plan.fired
    first = moves.calls[0]  # written in this order: the swap, then the move home to 2
    sources = {m.src for m in first}
    assert [m.request_id for m in first if m.dst in sources] == ids[:2]
    assert [(m.request_id, m.dst[0]) for m in first if m.dst not in sources] == [(ids[2], 2)]
    assert [done[i].outputs[0].token_ids for i in ids] == reference(batch)
    survivors = [0, 1]
    assert [i.instance_id for i in engine.instances] == survivors
    assert engine.num_free_blocks() == [14, 14] and engine.cluster_stats()["debts"] == []


def test_a_request_ended_by_the_lost_instance_in_its_last_step_is_reported(tiny_llama,
                                                                           reference):
    """Without lending, a request its pool can never hold ends in `schedule`; when its
    instance is lost in that same step, the end is still reported (and the other instance's
    request completes exactly)."""
    batch = prompts(5, (14, 6))  # 14 + 3 generated tokens need a 5th block of 4
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=4, num_instances=2,
              lending=False)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    for _ in range(3):  # the 14-token request computed positions 0..15: its 4 blocks are full
        assert not [o for o in engine.step() if o.finished]
    assert engine.streams[ids[0]].request.instance_id == 0
    engine.executor.set_fault(FaultPlan("sample", InstanceId(0)))
    outputs = engine.step()
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in outputs] == [
        (ids[0], True, "length")]
    assert [i.instance_id for i in engine.instances] == [1]
    done[ids[0]] = outputs[0]
    finish(engine, ids, done)
    expected = reference(batch)
    assert done[ids[0]].outputs[0].token_ids == expected[0][:3]
    assert done[ids[1]].outputs[0].token_ids == expected[1]
    assert engine.num_free_blocks() == [4]
