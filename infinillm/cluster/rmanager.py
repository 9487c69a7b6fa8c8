"""RManager: one instance's rBlocks and the block tables of the requests it owns.

Everything goes through request-level calls; no other class touches its pool or tables.
- As an owner: `allocate_slots` grows a request's table (local blocks first; the rest borrowed
  through the GManager's ledger, all or nothing), `free` gives every block back, local and lent.
- As a creditor: `lend` serves a loan from its own free blocks only, within its lending cap and
  after the blocks its own queue needs (`keep_free`, an argument from the ledger), so borrowing
  never chains; `take_back` receives a repayment.
- For a block move (recall, migration): `claim` reserves a destination block, `set_block` points
  the owner's table at it, `hand_over` passes a used block to another request (a swap), and
  `release` frees the source.

Cost: the rebalancer and the stats ask every step what is borrowed. The RManager keeps the
number of borrowed blocks and the set of requests with blocks elsewhere up to date as tables
change, so those questions cost O(1) or O(requests with remote blocks), never O(blocks).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from infinillm.kvcache import BlockPool, BlockTable, blocks_needed
from infinillm.kvcache.block_table import Location
from infinillm.types import BlockId, InstanceId, RequestId

if TYPE_CHECKING:
    from infinillm.cluster.gmanager import GManager


class RManager:
    def __init__(self, instance_id: InstanceId, num_blocks: int, block_size: int,
                 max_lent_blocks: int = 0, ledger: GManager | None = None) -> None:
        self.instance_id = instance_id
        self.block_size = block_size
        self.max_lent_blocks = max_lent_blocks
        self._pool = BlockPool(num_blocks, instance_id)
        self._tables: dict[RequestId, BlockTable] = {}
        self._ledger = ledger  # None: this instance neither borrows nor lends
        # Kept as tables change: the requests with blocks elsewhere, each with the creation
        # number of its table (to walk them in table order), and their number of such blocks.
        self._remote: dict[RequestId, int] = {}
        self._created: dict[RequestId, int] = {}
        self._num_tables_created = 0
        self._num_borrowed = 0

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_lent_blocks(self) -> int:
        return self._pool.num_lent

    def num_lendable_blocks(self, keep_free: int = 0) -> int:
        """Free blocks that may go to others: within the cap, after `keep_free` for the own
        queue."""
        return max(0, min(self._pool.num_free - keep_free,
                          self.max_lent_blocks - self._pool.num_lent))

    def num_available_blocks(self) -> int:
        """Blocks this instance could get now: its free ones plus what creditors may lend."""
        if self._ledger is None:
            return self._pool.num_free
        return self._pool.num_free + self._ledger.lendable_elsewhere(self.instance_id)

    def num_borrowed_blocks(self) -> int:
        """Blocks of this owner's tables held by other instances (O(1))."""
        return self._num_borrowed

    # ---- the owner side -------------------------------------------------------------------

    def allocate_slots(self, request_id: RequestId, num_tokens: int) -> bool:
        """Grow the request's table to hold positions [0, num_tokens); False, and nothing
        taken, when neither the local pool nor the creditors have the blocks."""
        table = self._tables.get(request_id)
        need = blocks_needed(num_tokens, self.block_size) - (len(table) if table else 0)
        if need <= 0:
            return True
        local = min(need, self._pool.num_free)
        borrowed: list[tuple[InstanceId, list[BlockId]]] = []
        if local < need:
            if self._ledger is None:
                return False
            borrowed = self._ledger.borrow(self.instance_id, request_id, need - local)
            if borrowed is None:
                return False
        if table is None:
            table = self._tables[request_id] = BlockTable()
            self._created[request_id] = self._num_tables_created
            self._num_tables_created += 1
        table.append(self.instance_id, self._pool.allocate(local, request_id))
        for creditor, blocks in borrowed:
            table.append(creditor, blocks)
            self._num_borrowed += len(blocks)
        if borrowed:
            self._remote[request_id] = self._created[request_id]
        return True

    def tokens_that_fit(self, request_id: RequestId, num_computed_tokens: int) -> int:
        """New tokens the request could take now: the rest of its table and the local free
        blocks (not what creditors may lend)."""
        table = self._tables.get(request_id)
        held = len(table) * self.block_size if table is not None else 0
        return held - num_computed_tokens + self._pool.num_free * self.block_size

    def block_locations(self, request_id: RequestId) -> list[Location]:
        """The request's table in logical order: (holder instance, block) pairs (a copy)."""
        return list(self._tables[request_id].entries)

    def block_view(self, request_id: RequestId) -> list[Location]:
        """The request's table in logical order, not copied: a read-only view that is valid
        until the table next changes (an allocation, a block move, or its freeing)."""
        return self._tables[request_id].entries

    def holder_counts(self, request_id: RequestId) -> dict[InstanceId, int]:
        """Blocks of the request's table on each holder instance (a copy; O(holders))."""
        return dict(self._tables[request_id].holders)

    def block_location(self, request_id: RequestId, index: int) -> Location:
        return self._tables[request_id].entries[index]

    def request_ids(self) -> list[RequestId]:
        """Requests that hold blocks here as their owner."""
        return list(self._tables)

    def holds_blocks_on(self, request_id: RequestId, instance: InstanceId) -> bool:
        table = self._tables.get(request_id)
        return table is not None and instance in table.holders

    def remote_entries(self, holder: InstanceId | None = None
                       ) -> Iterator[tuple[RequestId, int, Location]]:
        """(request, logical index, (holder, block)) of this owner's blocks held elsewhere
        (on `holder` only, when given), in table order. Walks only the tables with such
        blocks; the tables must not change while the iterator is in use."""
        for rid in sorted(self._remote, key=self._remote.__getitem__):
            table = self._tables[rid]
            if holder is not None and holder not in table.holders:
                continue
            for index, (where, block) in enumerate(table.entries):
                if where != self.instance_id and (holder is None or where == holder):
                    yield rid, index, (where, block)

    def free(self, request_id: RequestId) -> None:
        """Free every block of a request: local ones here, borrowed ones at their creditors."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        del self._created[request_id]
        if self._remote.pop(request_id, None) is None:
            self._pool.free(table.block_ids())
            return
        self._num_borrowed -= len(table) - table.num_blocks_on(self.instance_id)
        by_holder: dict[InstanceId, list[BlockId]] = {}
        for where, block in table.entries:
            by_holder.setdefault(where, []).append(block)
        self._pool.free(by_holder.pop(self.instance_id, []))
        for creditor, blocks in by_holder.items():
            self._ledger.repay(self.instance_id, creditor, request_id, blocks)

    def set_block(self, request_id: RequestId, index: int, location: Location) -> None:
        """Point logical block `index` at `location` (a move's table switch)."""
        table = self._tables[request_id]
        me = self.instance_id
        self._num_borrowed += (location[0] != me) - (table.entries[index][0] != me)
        table.set(index, location)
        if table.held_elsewhere(me):
            self._remote[request_id] = self._created[request_id]
        else:
            self._remote.pop(request_id, None)

    # ---- the creditor side ----------------------------------------------------------------

    def lend(self, request_id: RequestId, n: int, debtor: InstanceId,
             keep_free: int = 0) -> list[BlockId] | None:
        """Serve a loan from the local pool only; None when it would pass the cap or eat into
        the `keep_free` blocks the own queue needs."""
        if n > self.num_lendable_blocks(keep_free):
            return None
        return self._pool.allocate(n, request_id, owner=debtor)

    def take_back(self, blocks: list[BlockId]) -> None:
        """Blocks a debtor gives back (repayment, or a refused borrow undone)."""
        self._pool.free(blocks)

    # ---- block moves ----------------------------------------------------------------------

    def claim(self, request_id: RequestId, owner: InstanceId,
              keep_free: int = 0) -> BlockId | None:
        """Reserve one block here as the destination of a move of `owner`'s request: a block
        of the own pool when this is the owner, else a loan. None when there is none."""
        if owner == self.instance_id:
            blocks = self._pool.allocate(1, request_id)
        else:
            blocks = self.lend(request_id, 1, owner, keep_free)
        return None if blocks is None else blocks[0]

    def hand_over(self, block: BlockId, request_id: RequestId, owner: InstanceId) -> None:
        """Make a used block belong to `owner`'s `request_id` (the far side of a swap); a no-op
        when it already does."""
        if self._pool.holder(block) != (request_id, owner):
            self._pool.reassign(block, request_id, owner)

    def release(self, blocks: list[BlockId]) -> None:
        """Free the sources of completed moves."""
        self._pool.free(blocks)

    # ---- checks ---------------------------------------------------------------------------

    def lent_blocks(self) -> dict[tuple[InstanceId, RequestId], int]:
        """Blocks lent out, per (owner instance, request)."""
        return self._pool.lent_blocks()

    def check_integrity(self) -> None:
        self._pool.check_integrity()
        self._check_counts()
        own = [(rid, b) for rid, t in self._tables.items() for b in t.blocks_on(self.instance_id)]
        if len({b for _, b in own}) != len(own):
            raise RuntimeError(f"instance {self.instance_id}: a block is in two tables")
        for rid, block in own:
            if self._pool.holder(block) != (rid, self.instance_id):
                raise RuntimeError(f"instance {self.instance_id}: block {block} is in {rid}'s "
                                   f"table but held by {self._pool.holder(block)}")
        if len(own) + self._pool.num_lent != self._pool.num_used:
            raise RuntimeError(
                f"instance {self.instance_id}: tables hold {len(own)} local blocks and "
                f"{self._pool.num_lent} are lent, but the pool has {self._pool.num_used} used"
            )
        if self._pool.num_lent > self.max_lent_blocks:
            raise RuntimeError(f"instance {self.instance_id}: {self._pool.num_lent} blocks "
                               f"lent, cap {self.max_lent_blocks}")

    def _check_counts(self) -> None:
        """The incrementally kept counts equal a recount of the tables."""
        me = self.instance_id
        for rid, table in self._tables.items():
            counts: dict[InstanceId, int] = {}
            for where, _ in table.entries:
                counts[where] = counts.get(where, 0) + 1
            if counts != table.holders:
                raise RuntimeError(f"instance {me}: {rid}'s table holds {counts} per instance, "
                                   f"its counts say {table.holders}")
        remote = [(rid, index, loc) for rid, t in self._tables.items()
                  for index, loc in enumerate(t.entries) if loc[0] != me]
        if (list(self.remote_entries()) != remote
                or set(self._remote) != {rid for rid, _, _ in remote}
                or self._created.keys() != self._tables.keys()):
            raise RuntimeError(f"instance {me}: remote blocks {remote} (in table order), "
                               f"kept as {list(self.remote_entries())} of {sorted(self._remote)}")
        borrowed = sum(len(t) - t.num_blocks_on(me) for t in self._tables.values())
        if borrowed != self._num_borrowed:
            raise RuntimeError(f"instance {me}: {borrowed} blocks borrowed, counter says "
                               f"{self._num_borrowed}")
