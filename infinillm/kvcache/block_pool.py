"""BlockPool: the rBlocks of one instance, as integer ids; no tensors.

Every block is in exactly one state: free, used by a request of this instance, or lent (used by
a request whose owner is another instance). Each used block records its request and that
request's owner instance. Allocation hands out the lowest free ids first: that keeps a growing
request's blocks adjacent in memory, which lets attention read runs of blocks in place (see
attention/paged.py), and makes block ids predictable in tests.
"""

from __future__ import annotations

import heapq

from infinillm.types import BlockId, InstanceId, RequestId


class BlockPool:
    def __init__(self, num_blocks: int, instance_id: InstanceId | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.instance_id = InstanceId(0) if instance_id is None else instance_id
        self._free: list[int] = list(range(num_blocks))  # a heap
        self._holder: dict[BlockId, tuple[RequestId, InstanceId]] = {}
        self.num_lent = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks in use, by this instance's requests or lent to others."""
        return len(self._holder)

    def allocate(self, n: int, request_id: RequestId,
                 owner: InstanceId | None = None) -> list[BlockId] | None:
        """Take `n` free blocks for `request_id` (owned by `owner`, default this instance);
        None, and nothing taken, if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        owner = self.instance_id if owner is None else owner
        ids = [BlockId(heapq.heappop(self._free)) for _ in range(n)]
        for block in ids:
            self._holder[block] = (request_id, owner)
        if owner != self.instance_id:
            self.num_lent += n
        return ids

    def free(self, block_ids: list[BlockId]) -> None:
        for block in block_ids:
            held = self._holder.pop(block, None)
            if held is None:
                raise RuntimeError(f"instance {self.instance_id}: block {block} freed but not "
                                   "allocated")
            if held[1] != self.instance_id:
                self.num_lent -= 1
            heapq.heappush(self._free, block)

    def reassign(self, block: BlockId, request_id: RequestId, owner: InstanceId) -> None:
        """Hand a used block to another request (a swap during recall)."""
        old = self._holder.get(block)
        if old is None:
            raise RuntimeError(f"instance {self.instance_id}: reassigning free block {block}")
        self.num_lent += (owner != self.instance_id) - (old[1] != self.instance_id)
        self._holder[block] = (request_id, owner)

    def holder(self, block: BlockId) -> tuple[RequestId, InstanceId] | None:
        return self._holder.get(block)

    def blocks_of(self, request_id: RequestId) -> list[BlockId]:
        return sorted(b for b, (r, _) in self._holder.items() if r == request_id)

    def lent_blocks(self) -> dict[tuple[InstanceId, RequestId], int]:
        """Blocks lent out, counted per (owner instance, request)."""
        counts: dict[tuple[InstanceId, RequestId], int] = {}
        for request_id, owner in self._holder.values():
            if owner != self.instance_id:
                counts[owner, request_id] = counts.get((owner, request_id), 0) + 1
        return counts

    def check_integrity(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError(f"instance {self.instance_id}: free list has duplicates")
        used = set(self._holder)
        if free & used:
            raise RuntimeError(f"instance {self.instance_id}: blocks both free and used: "
                               f"{sorted(free & used)}")
        if free | used != set(range(self.num_blocks)):
            missing = set(range(self.num_blocks)) - free - used
            raise RuntimeError(f"instance {self.instance_id}: blocks lost: {sorted(missing)}")
        lent = sum(1 for _, owner in self._holder.values() if owner != self.instance_id)
        if lent != self.num_lent:
            raise RuntimeError(f"instance {self.instance_id}: {lent} blocks lent, counter says "
                               f"{self.num_lent}")
