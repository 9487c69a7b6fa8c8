"""The prefix cache in one pool: keys, reference counts, LRU eviction, integrity."""

from __future__ import annotations

import hashlib

import pytest

from infinillm.kvcache import BlockPool
from infinillm.kvcache.prefix import block_keys
from infinillm.types import InstanceId, RequestId

R1, R2, R3 = RequestId("r1"), RequestId("r2"), RequestId("r3")
A, B = InstanceId(0), InstanceId(1)


def test_keys_chain_the_prefix_and_cover_full_blocks_only():
    keys = block_keys([1, 2, 3, 4, 5, 6, 7], 3, [])
    assert len(keys) == 2  # the third block (token 7) is not full
    # an independent spelling of the scheme: sha256(parent | int64 token ids)
    first = hashlib.sha256((1).to_bytes(8, "little") + (2).to_bytes(8, "little")
                           + (3).to_bytes(8, "little")).digest()
    assert keys[0] == first
    second = hashlib.sha256(first + b"".join(t.to_bytes(8, "little") for t in (4, 5, 6)))
    assert keys[1] == second.digest()
    # the same block after a different prefix has another key; extending keeps what is there
    assert block_keys([9, 2, 3, 4, 5, 6], 3, [])[1] != keys[1]
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, keys) is keys and len(keys) == 3
    assert block_keys([1, 2, 3], 3, [], extra=("lora", 1))[0] != first


def test_freed_published_blocks_stay_cached_and_count_as_free():
    pool = BlockPool(4)
    blocks = pool.allocate(3, R1)
    assert pool.publish(blocks[0], b"k0") and pool.publish(blocks[1], b"k1")
    assert not pool.publish(blocks[2], b"k0")  # a twin of k0: stays uncached
    pool.free(blocks, R1)
    assert pool.num_cached == pool.num_evictable == 2
    assert pool.num_free == 4  # "full": free plus cached-unreferenced
    assert pool.lookup(b"k1") == blocks[1] and pool.lookup(b"k2") is None
    pool.check_integrity()


def test_shared_block_is_freed_only_by_its_last_reference():
    pool = BlockPool(3, A)
    (block,) = pool.allocate(1, R1)
    pool.publish(block, b"k")
    pool.share(block, R2, A)
    pool.share(block, R3, B)  # another instance's request reads it in place
    assert pool.ref_count(block) == 3 and pool.holder(block) is None
    assert pool.lent_blocks() == {(B, R3): 1} and pool.num_lent == 0  # a share is no loan
    pool.free([block], R1)
    pool.free([block], R3, B)
    assert pool.ref_count(block) == 1 and pool.holder(block) == (R2, A)
    with pytest.raises(RuntimeError, match="freed by"):
        pool.free([block], R3, B)  # R3 let go already
    pool.free([block], R2)
    assert pool.ref_count(block) == 0 and pool.num_evictable == 1
    pool.share(block, R1, A)  # a hit on an evictable block takes it out of the free count
    assert pool.num_free == 2
    pool.check_integrity()


def test_allocation_takes_free_blocks_first_then_evicts_least_recently_used():
    pool = BlockPool(4)
    blocks = pool.allocate(4, R1)
    for i, b in enumerate(blocks):
        pool.publish(b, f"k{i}".encode())
    pool.free([blocks[2], blocks[0]], R1)  # cached in this order: 2 then 0
    pool.free([blocks[3]], R1)
    pool.lookup(b"k2")  # a lookup makes 2 the most recently used
    pool.free([blocks[1]], R1)
    assert pool.allocate(2, R2) == [blocks[0], blocks[3]]
    assert pool.lookup(b"k0") is None and pool.lookup(b"k3") is None
    assert pool.lookup(b"k2") == blocks[2] and pool.num_evictions == 2
    pool.check_integrity()


def test_integrity_catches_a_wrong_index_and_a_reference_to_a_free_block():
    pool = BlockPool(3)
    blocks = pool.allocate(2, R1)
    pool.publish(blocks[0], b"k")
    pool._index[b"other"] = blocks[1]  # corrupt: an index entry without its block's key
    with pytest.raises(RuntimeError, match="prefix index"):
        pool.check_integrity()
    del pool._index[b"other"]
    pool.check_integrity()
    pool._sharers[2] = {(R2, A)}  # corrupt: a reference to a free block
    with pytest.raises(RuntimeError, match="sharers"):
        pool.check_integrity()


def test_a_swap_overwrites_a_cached_block_so_it_leaves_the_index():
    pool = BlockPool(2, A)
    (block,) = pool.allocate(1, R1)
    pool.publish(block, b"k")
    pool.reassign(block, R2, B)
    assert pool.lookup(b"k") is None and pool.num_lent == 1
    pool.check_integrity()


def test_a_shared_loan_ends_with_its_borrower_and_integrity_checks_the_loans():
    pool = BlockPool(2, A)
    first, second = pool.allocate(2, R1, owner=B)  # both lent to B's request
    pool.publish(first, b"k0")
    pool.publish(second, b"k1")
    pool.share(first, R2, A)  # a local request shares one
    pool.share(second, R3, InstanceId(2))  # a third instance's request the other
    assert pool.num_lent == 2
    pool.free([first, second], R1, B)
    assert pool.holders(first) == {(R2, A)} and pool.holders(second) == {(R3, InstanceId(2))}
    assert pool.num_lent == 0  # shared cached blocks, no loans
    pool.check_integrity()
    pool._loaned.add(first)  # corrupt: a loan held by this instance's own request
    with pytest.raises(RuntimeError, match="loans"):
        pool.check_integrity()
