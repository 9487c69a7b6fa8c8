"""RManager: one instance's pool and block tables, exact block ids and conservation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from infinillm.cluster import RManager
from infinillm.kvcache import blocks_needed
from infinillm.types import InstanceId, RequestId


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
