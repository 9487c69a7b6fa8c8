"""BlockPool: the rBlocks of one instance, as integer ids; no tensors.

Every block is either free or held by exactly one request (the request may run on this
instance or, once lending exists, on another). Allocation hands out the lowest free ids first:
that keeps a growing request's blocks adjacent in memory, which lets attention read runs of
blocks in place (see attention/paged.py), and makes block ids predictable in tests.
"""

from __future__ import annotations

import heapq

from infinillm.types import BlockId, RequestId


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks))  # a heap
        self._holder: dict[BlockId, RequestId] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._holder)

    def allocate(self, n: int, request_id: RequestId) -> list[BlockId] | None:
        """Take `n` free blocks for `request_id`; None (and nothing taken) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        ids = [BlockId(heapq.heappop(self._free)) for _ in range(n)]
        for block in ids:
            self._holder[block] = request_id
        return ids

    def free(self, block_ids: list[BlockId]) -> None:
        for block in block_ids:
            if self._holder.pop(block, None) is None:
                raise RuntimeError(f"block {block} freed but not allocated")
            heapq.heappush(self._free, block)

    def holder(self, block: BlockId) -> RequestId | None:
        return self._holder.get(block)

    def blocks_of(self, request_id: RequestId) -> list[BlockId]:
        return sorted(b for b, r in self._holder.items() if r == request_id)

    def check_integrity(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError(f"free list has duplicates: {sorted(self._free)}")
        used = set(self._holder)
        if free & used:
            raise RuntimeError(f"blocks both free and used: {sorted(free & used)}")
        if free | used != set(range(self.num_blocks)):
            missing = set(range(self.num_blocks)) - free - used
            raise RuntimeError(f"blocks lost: {sorted(missing)} of {self.num_blocks}")
