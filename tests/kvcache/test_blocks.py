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
