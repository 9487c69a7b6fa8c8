"""BlockPool and BlockTable: exact block ids, refusals and integrity checks."""

from __future__ import annotations

import pytest

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


def test_block_table_counts_its_blocks_per_holder_as_it_changes():
    i0, i1, i2 = InstanceId(0), InstanceId(1), InstanceId(2)
    table = BlockTable()
    table.append(i0, [4, 2])
    table.append(i1, [7])
    table.append(i2, [])  # no blocks: not a holder
    assert table.holders == {0: 2, 1: 1} and table.instances() == {0, 1}
    assert table.num_blocks_on(i1) == 1 and table.num_blocks_on(i2) == 0
    assert table.held_elsewhere(i0) and table.held_elsewhere(i1) and table.held_elsewhere(i2)
    table.set(2, (i0, 9))  # the borrowed block comes home
    assert table.entries == [(0, 4), (0, 2), (0, 9)]
    assert table.holders == {0: 3} and not table.held_elsewhere(i0)
    assert table.blocks_on(i0) == [4, 2, 9] and table.blocks_on(i1) == []
    table.set(0, (i2, 1))
    assert table.entries == [(2, 1), (0, 2), (0, 9)] and table.holders == {0: 2, 2: 1}
    assert table.blocks_on(i0) == [2, 9] and table.blocks_on(i2) == [1]
    assert BlockTable(list(table.entries)).holders == table.holders  # counted when built whole
