"""BlockPool, BlockTable and RManager: exact block ids and conservation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinillm.cluster import RManager
from infinillm.kvcache import BlockPool, BlockTable, blocks_needed
from infinillm.types import InstanceId, RequestId


def test_pool_hands_out_lowest_ids_and_refuses_whole():
    pool = BlockPool(6)
    assert pool.allocate(2, RequestId("a")) == [0, 1]
    assert pool.allocate(3, RequestId("b")) == [2, 3, 4]
    assert pool.allocate(2, RequestId("c")) is None  # only one free: nothing taken
    assert pool.num_free == 1
    pool.free([0, 1])
    assert pool.allocate(3, RequestId("c")) == [0, 1, 5]
    assert pool.blocks_of(RequestId("c")) == [0, 1, 5]
    pool.check_integrity()


def test_pool_rejects_double_free_and_detects_corruption():
    pool = BlockPool(3)
    ids = pool.allocate(1, RequestId("a"))
    pool.free(ids)
    with pytest.raises(RuntimeError, match="freed but not allocated"):
        pool.free(ids)
    pool._free.append(0)  # corrupt: block 0 listed twice
    with pytest.raises(RuntimeError):
        pool.check_integrity()


def test_block_table_and_blocks_needed():
    table = BlockTable()
    table.append(InstanceId(0), [4, 2])
    table.append(InstanceId(1), [7])
    assert table.block_ids() == [4, 2, 7]
    assert table.blocks_on(InstanceId(0)) == [4, 2]
    assert table.instances() == {0, 1}
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
    assert blocks_needed(7, 1) == 7


def test_rmanager_grows_tables_and_frees():
    rm = RManager(InstanceId(0), num_blocks=5, block_size=4)
    assert rm.allocate_slots(RequestId("a"), 5)  # 2 blocks
    assert [b for _, b in rm.block_locations(RequestId("a"))] == [0, 1]
    assert rm.allocate_slots(RequestId("a"), 8)  # still 2 blocks
    assert rm.allocate_slots(RequestId("b"), 4)
    assert [b for _, b in rm.block_locations(RequestId("b"))] == [2]
    assert rm.allocate_slots(RequestId("a"), 9)
    assert [b for _, b in rm.block_locations(RequestId("a"))] == [0, 1, 3]
    assert not rm.allocate_slots(RequestId("b"), 12)  # needs 2 more, 1 free: nothing taken
    assert rm.num_free_blocks == 1
    rm.check_integrity()
    rm.free(RequestId("a"))
    rm.free(RequestId("b"))
    assert rm.num_free_blocks == 5
    rm.check_integrity()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("grow free".split()), st.integers(0, 4),
                          st.integers(1, 30)), max_size=60))
def test_rmanager_conservation(ops):
    rm = RManager(InstanceId(0), num_blocks=12, block_size=3)
    lengths: dict[RequestId, int] = {}
    for op, who, n in ops:
        rid = RequestId(str(who))
        if op == "grow":
            target = lengths.get(rid, 0) + n
            before = rm.num_free_blocks
            if rm.allocate_slots(rid, target):
                lengths[rid] = target
            else:
                assert rm.num_free_blocks == before
        else:
            rm.free(rid)
            lengths.pop(rid, None)
        rm.check_integrity()
        used = sum(blocks_needed(n, 3) for n in lengths.values())
        assert rm.num_free_blocks == 12 - used
    for rid in list(lengths):
        rm.free(rid)
    assert rm.num_free_blocks == 12
    rm.check_integrity()
