"""RManager: one instance's rBlocks and the block tables of the requests it owns.

The scheduler talks to it only through request-level calls (`allocate_slots`, `free`).
Allocation is local first; when the local pool runs short and lending is on, the RManager asks
the GManager to reserve blocks on creditors and then asks each creditor's RManager to `lend`
them. A creditor serves a loan from its own free blocks only and refuses what it cannot serve
or what would pass its lending cap, so borrowing never chains. An allocation is all or nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from infinillm.kvcache import BlockPool, BlockTable, blocks_needed
from infinillm.types import BlockId, InstanceId, RequestId

if TYPE_CHECKING:
    from infinillm.cluster.gmanager import GManager


class RManager:
    def __init__(self, instance_id: InstanceId, num_blocks: int, block_size: int,
                 max_lent_blocks: int = 0) -> None:
        self.instance_id = instance_id
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, instance_id)
        self.max_lent_blocks = max_lent_blocks
        self.tables: dict[RequestId, BlockTable] = {}
        self.gmanager: GManager | None = None  # set by GManager.register when lending is on
        # Set by the engine each step from the scheduler's queue: blocks not to lend out, and
        # lent blocks this instance wants back for its own queue.
        self.queue_demand = 0
        self.reclaim_wanted = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_lent_blocks(self) -> int:
        return self.pool.num_lent

    @property
    def num_lendable_blocks(self) -> int:
        """Free blocks that may go to others: within the cap, after the own queue's needs."""
        return max(0, min(self.pool.num_free - self.queue_demand,
                          self.max_lent_blocks - self.pool.num_lent))

    def num_available_blocks(self) -> int:
        """Blocks this instance could get now: its free ones plus what creditors may lend."""
        if self.gmanager is None:
            return self.pool.num_free
        return self.pool.num_free + self.gmanager.lendable_elsewhere(self.instance_id)

    def num_borrowed_blocks(self) -> int:
        return sum(len(t) - len(t.blocks_on(self.instance_id)) for t in self.tables.values())

    # ---- the owner side -------------------------------------------------------------------

    def allocate_slots(self, request_id: RequestId, num_tokens: int) -> bool:
        """Grow the request's table to hold positions [0, num_tokens); False, and nothing
        taken, when neither the local pool nor the creditors have the blocks."""
        table = self.tables.get(request_id)
        need = blocks_needed(num_tokens, self.block_size) - (len(table) if table else 0)
        if need <= 0:
            return True
        local = min(need, self.pool.num_free)
        borrowed: list[tuple[InstanceId, list[BlockId]]] = []
        if local < need:
            if self.gmanager is None:
                return False
            borrowed = self.gmanager.borrow(self.instance_id, request_id, need - local)
            if borrowed is None:
                return False
        if table is None:
            table = self.tables[request_id] = BlockTable()
        table.append(self.instance_id, self.pool.allocate(local, request_id))
        for creditor, blocks in borrowed:
            table.append(creditor, blocks)
        return True

    def table(self, request_id: RequestId) -> BlockTable:
        return self.tables[request_id]

    def free(self, request_id: RequestId) -> None:
        """Free every block of a request: local ones here, borrowed ones at their creditors."""
        table = self.tables.pop(request_id, None)
        if table is None:
            return
        self.pool.free(table.blocks_on(self.instance_id))
        for creditor in table.instances() - {self.instance_id}:
            self.gmanager.repay(self.instance_id, creditor, request_id,
                                table.blocks_on(creditor))

    # ---- the creditor side ----------------------------------------------------------------

    def lend(self, request_id: RequestId, n: int, debtor: InstanceId) -> list[BlockId] | None:
        """Serve a loan from the local pool only; None when it would pass the cap or the pool."""
        if n > self.num_lendable_blocks:
            return None
        return self.pool.allocate(n, request_id, owner=debtor)

    # ---- checks ---------------------------------------------------------------------------

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        own = [(rid, b) for rid, t in self.tables.items() for b in t.blocks_on(self.instance_id)]
        if len({b for _, b in own}) != len(own):
            raise RuntimeError(f"instance {self.instance_id}: a block is in two tables")
        for rid, block in own:
            if self.pool.holder(block) != (rid, self.instance_id):
                raise RuntimeError(f"instance {self.instance_id}: block {block} is in {rid}'s "
                                   f"table but held by {self.pool.holder(block)}")
        if len(own) + self.pool.num_lent != self.pool.num_used:
            raise RuntimeError(
                f"instance {self.instance_id}: tables hold {len(own)} local blocks and "
                f"{self.pool.num_lent} are lent, but the pool has {self.pool.num_used} used"
            )
        if self.pool.num_lent > self.max_lent_blocks:
            raise RuntimeError(f"instance {self.instance_id}: {self.pool.num_lent} blocks lent, "
                               f"cap {self.max_lent_blocks}")
