"""BlockPool: the rBlocks of one instance, as integer ids; no tensors.

Every block is in exactly one state:
- free: in the free list;
- used: held by one or more requests (its reference count), each recorded with its owner
  instance (this one, or the instance of a request it is lent or shared to);
- cached: unreferenced, but its K/V are a full block of some token prefix, found by that
  prefix's hash (`lookup`); evictable, least recently used first, whenever blocks are needed.
A used block may carry a hash as well (it is cached and in use: a prefix hit shares it).

Free capacity is the free list and the cached blocks together (`num_free`): allocation takes
the free list first, lowest ids first (that keeps a growing request's blocks adjacent in memory,
which lets attention read runs of blocks in place, and makes block ids predictable in tests),
then evicts cached blocks, least recently used first. "Full" (every request ended) means
`num_free == num_blocks`: free and cached blocks make up the whole pool.

`num_lent` counts the blocks allocated as loans (`allocate` for another owner, or `reassign`ed
to one) still held by the request they were allocated for (always the first holder): the lending
cap applies to them. Sharing an already cached block with another instance's request costs no
memory and is not a loan, though the ledger records it as a debt like one; so when a lent block
that others share loses its borrower, it is no loan any more, whoever the sharers are.

Cost: the first holder of a block is kept as a plain tuple; only shared blocks keep a set of
the others, so the unshared common case costs what it did before sharing existed.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable

from infinillm.types import BlockId, InstanceId, RequestId

Holder = tuple[RequestId, InstanceId]


class BlockPool:
    def __init__(self, num_blocks: int, instance_id: InstanceId | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.instance_id = InstanceId(0) if instance_id is None else instance_id
        self._free: list[int] = list(range(num_blocks))  # a heap
        self._holder: dict[BlockId, Holder] = {}  # used blocks: the first holder
        self._sharers: dict[BlockId, set[Holder]] = {}  # shared blocks: the other holders
        self._loaned: set[BlockId] = set()
        self._hash_of: dict[BlockId, Hashable] = {}  # blocks in the prefix index
        self._index: dict[Hashable, BlockId] = {}
        self._evictable: OrderedDict[BlockId, None] = OrderedDict()  # cached, LRU first
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks in use, by this instance's requests or lent or shared to others."""
        return len(self._holder)

    @property
    def num_lent(self) -> int:
        return len(self._loaned)

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix index, in use or not."""
        return len(self._hash_of)

    @property
    def num_evictable(self) -> int:
        """Cached blocks no request uses (counted in `num_free`)."""
        return len(self._evictable)

    def allocate(self, n: int, request_id: RequestId,
                 owner: InstanceId | None = None) -> list[BlockId] | None:
        """Take `n` blocks for `request_id` (owned by `owner`, default this instance): free
        ones first, then evicted cached ones; None, and nothing taken, if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            return None
        owner = self.instance_id if owner is None else owner
        ids = [BlockId(heapq.heappop(self._free)) for _ in range(min(n, len(self._free)))]
        while len(ids) < n:
            block, _ = self._evictable.popitem(last=False)
            del self._index[self._hash_of.pop(block)]
            self.num_evictions += 1
            ids.append(block)
        for block in ids:
            self._holder[block] = (request_id, owner)
        if owner != self.instance_id:
            self._loaned.update(ids)
        return ids

    def share(self, block: BlockId, request_id: RequestId, owner: InstanceId) -> None:
        """One more reference to a cached block (a prefix hit)."""
        if block not in self._hash_of:
            raise RuntimeError(f"instance {self.instance_id}: sharing uncached block {block}")
        held = self._holder.get(block)
        if held is None:
            del self._evictable[block]
            self._holder[block] = (request_id, owner)
        else:
            self._sharers.setdefault(block, set()).add((request_id, owner))

    def free(self, block_ids: list[BlockId], request_id: RequestId | None = None,
             owner: InstanceId | None = None) -> None:
        """Drop `request_id`'s reference (owned by `owner`, default this instance) to each
        block; without a request, the block's only holder. A block nobody holds any more is
        cached if it is in the prefix index (most recently used last), else free."""
        holder = None if request_id is None else (
            request_id, self.instance_id if owner is None else owner)
        for block in block_ids:
            self._drop(block, holder)

    def _drop(self, block: BlockId, holder: Holder | None) -> None:
        first = self._holder.get(block)
        if first is None:
            raise RuntimeError(f"instance {self.instance_id}: block {block} freed but not "
                               "allocated")
        others = self._sharers.get(block)
        if holder is None or holder == first:
            if others:
                if holder is None:
                    raise RuntimeError(f"instance {self.instance_id}: block {block} is shared; "
                                       "say which request frees it")
                self._holder[block] = others.pop()
                if not others:
                    del self._sharers[block]
                # The loan ends with the request it was allocated for: the others only share
                # a cached block, which is no loan whoever owns them (as when it is shared
                # after the borrower ended).
                self._loaned.discard(block)
                return
        elif others and holder in others:
            others.remove(holder)
            if not others:
                del self._sharers[block]
            return
        else:
            raise RuntimeError(f"instance {self.instance_id}: block {block} freed by "
                               f"{holder}, held by {first} and {others or set()}")
        del self._holder[block]
        self._loaned.discard(block)
        if block in self._hash_of:
            self._evictable[block] = None
        else:
            heapq.heappush(self._free, block)

    def reassign(self, block: BlockId, request_id: RequestId, owner: InstanceId) -> None:
        """Hand a used, unshared block to another request (a swap during recall). Its data
        will be overwritten by the move, so it leaves the prefix index."""
        old = self._holder.get(block)
        if old is None or block in self._sharers:
            raise RuntimeError(f"instance {self.instance_id}: reassigning block {block}, "
                               f"held by {old} and {self._sharers.get(block, set())}")
        self._holder[block] = (request_id, owner)
        self._loaned.discard(block)
        if owner != self.instance_id:
            self._loaned.add(block)
        self.uncache(block)

    def uncache(self, block: BlockId) -> Hashable | None:
        """Take a block out of the prefix index (its data are being overwritten, or its key
        moves with them): a used one goes to the free list, not the cache, when its holders
        end; an unused one goes now. Returns its key, if it had one."""
        key = self._hash_of.pop(block, None)
        if key is None:
            return None
        del self._index[key]
        if block in self._evictable:
            del self._evictable[block]
            heapq.heappush(self._free, block)
        return key

    # ---- the prefix index -----------------------------------------------------------------

    def publish(self, block: BlockId, key: Hashable) -> bool:
        """Enter a used block whose K/V are complete into the prefix index under `key`; False
        when the key already names another block (its twin stays uncached) or the block has
        a key already."""
        if block not in self._holder:
            raise RuntimeError(f"instance {self.instance_id}: publishing unused block {block}")
        if key in self._index or block in self._hash_of:
            return self._index.get(key) == block
        self._index[key] = block
        self._hash_of[block] = key
        return True

    def lookup(self, key: Hashable) -> BlockId | None:
        """The cached block of `key`, if any (used or evictable); marks it recently used."""
        block = self._index.get(key)
        if block is not None and block in self._evictable:
            self._evictable.move_to_end(block)
        return block

    def lookup_quiet(self, key: Hashable) -> BlockId | None:
        """`lookup` without marking the block used (to ask, not to take)."""
        return self._index.get(key)

    # ---- reading --------------------------------------------------------------------------

    def holder(self, block: BlockId) -> Holder | None:
        """The block's holder when it has exactly one; None when free, cached or shared."""
        return None if block in self._sharers else self._holder.get(block)

    def holders(self, block: BlockId) -> set[Holder]:
        first = self._holder.get(block)
        if first is None:
            return set()
        return {first, *self._sharers.get(block, ())}

    def ref_count(self, block: BlockId) -> int:
        if block not in self._holder:
            return 0
        return 1 + len(self._sharers.get(block, ()))

    def blocks_of(self, request_id: RequestId) -> list[BlockId]:
        return sorted(b for b in self._holder if any(r == request_id for r, _ in self.holders(b)))

    def all_holders(self) -> list[tuple[BlockId, Holder]]:
        """Every (block, holder) reference."""
        refs = list(self._holder.items())
        refs += [(b, h) for b, others in self._sharers.items() for h in others]
        return refs

    def lent_blocks(self) -> dict[tuple[InstanceId, RequestId], int]:
        """References held by other instances' requests (loans and shared cached blocks),
        counted per (owner instance, request)."""
        counts: dict[tuple[InstanceId, RequestId], int] = {}
        for _, (request_id, owner) in self.all_holders():
            if owner != self.instance_id:
                counts[owner, request_id] = counts.get((owner, request_id), 0) + 1
        return counts

    def check_integrity(self) -> None:
        me = self.instance_id
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError(f"instance {me}: free list has duplicates")
        used, cached = set(self._holder), set(self._evictable)
        for name, a, b in (("free and used", free, used), ("free and cached", free, cached),
                           ("used and cached", used, cached)):
            if a & b:
                raise RuntimeError(f"instance {me}: blocks both {name}: {sorted(a & b)}")
        if free | used | cached != set(range(self.num_blocks)):
            missing = set(range(self.num_blocks)) - free - used - cached
            raise RuntimeError(f"instance {me}: blocks lost: {sorted(missing)}")
        if not set(self._sharers) <= used or not all(self._sharers.values()):
            raise RuntimeError(f"instance {me}: sharers {self._sharers} of unused blocks")
        if not self._loaned <= used:
            raise RuntimeError(f"instance {me}: loans {sorted(self._loaned - used)} not in use")
        local = {b for b in self._loaned if self._holder[b][1] == me}
        if local:
            raise RuntimeError(f"instance {me}: loans {sorted(local)} held by this instance's "
                               "requests")
        if not cached <= set(self._hash_of) or not set(self._hash_of) <= used | cached:
            raise RuntimeError(f"instance {me}: cached blocks {sorted(cached)} and indexed "
                               f"blocks {sorted(self._hash_of)} disagree")
        if {b: k for k, b in self._index.items()} != self._hash_of:
            raise RuntimeError(f"instance {me}: the prefix index and its blocks disagree")
