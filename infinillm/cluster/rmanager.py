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
- For the prefix cache: `take_cached` starts a request's table with the longest run of cached
  full blocks that begins its tokens, wherever they live (here, or shared in place on another
  instance through the ledger, which records the reference as a debt); `publish` enters the
  full blocks a request has computed into their holders' prefix index. A shared block is
  referenced by every table that holds it; `free` drops the request's references only.

Cost: the rebalancer and the stats ask every step what is borrowed. The RManager keeps the
number of borrowed blocks and the set of requests with blocks elsewhere up to date as tables
change, so those questions cost O(1) or O(requests with remote blocks), never O(blocks).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from infinillm.kvcache import BlockPool, BlockTable, blocks_needed
from infinillm.kvcache.block_table import Location
from infinillm.kvcache.prefix import BlockKey
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
        self._num_published: dict[RequestId, int] = {}  # leading blocks in the prefix index
        self._num_hit: dict[RequestId, int] = {}  # leading blocks taken from the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_lent_blocks(self) -> int:
        return self._pool.num_lent

    @property
    def num_cached_blocks(self) -> int:
        """Blocks of this pool in the prefix index (in use or evictable)."""
        return self._pool.num_cached

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks no request uses; counted as free."""
        return self._pool.num_evictable

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
            table = self._new_table(request_id)
        table.append(self.instance_id, self._pool.allocate(local, request_id))
        for creditor, blocks in borrowed:
            table.append(creditor, blocks)
            self._num_borrowed += len(blocks)
        if borrowed:
            self._remote[request_id] = self._created[request_id]
        return True

    def _new_table(self, request_id: RequestId) -> BlockTable:
        table = self._tables[request_id] = BlockTable()
        self._created[request_id] = self._num_tables_created
        self._num_tables_created += 1
        return table

    # ---- the prefix cache -----------------------------------------------------------------

    def cached_prefix(self, keys: list[BlockKey]) -> list[Location]:
        """Where the longest run of cached blocks named by `keys` (from the first) lives:
        each block here when cached here, else on another instance that has it (only with a
        ledger). Marks them recently used."""
        me = self.instance_id
        others = ([rm for i, rm in self._ledger.rmanagers.items() if i != me]
                  if self._ledger is not None else [])
        found: list[Location] = []
        for key in keys:
            block = self._pool.lookup(key)
            if block is not None:
                found.append((me, block))
                continue
            for rm in others:
                block = rm.lookup(key)
                if block is not None:
                    found.append((rm.instance_id, block))
                    break
            else:
                break
        return found

    def num_cached_here(self, keys: list[BlockKey]) -> int:
        """The leading blocks of `keys` cached in this pool (for routing; touches nothing)."""
        n = 0
        for key in keys:
            if self._pool.lookup_quiet(key) is None:
                break
            n += 1
        return n

    def take_cached(self, request_id: RequestId, keys: list[BlockKey]) -> int:
        """Start `request_id`'s table (it has none) with the longest cached prefix of `keys`,
        shared in place wherever it lives; the number of blocks taken."""
        if request_id in self._tables:
            raise RuntimeError(f"instance {self.instance_id}: {request_id} already has blocks")
        found = self.cached_prefix(keys)
        if not found:
            return 0
        me = self.instance_id
        table = self._new_table(request_id)
        by_holder: dict[InstanceId, list[BlockId]] = {}
        for where, block in found:
            by_holder.setdefault(where, []).append(block)
        for block in by_holder.pop(me, []):
            self._pool.share(block, request_id, me)
        for holder, blocks in by_holder.items():
            self._ledger.share(me, holder, request_id, blocks)
        for where, block in found:
            table.append(where, [block])
        borrowed = len(found) - table.num_blocks_on(me)
        if borrowed:
            self._num_borrowed += borrowed
            self._remote[request_id] = self._created[request_id]
        self._num_published[request_id] = self._num_hit[request_id] = len(found)
        return len(found)

    def publish(self, request_id: RequestId, keys: list[BlockKey], num_full: int) -> None:
        """Enter the request's first `num_full` blocks (full, their K/V computed; `keys` names
        at least that many) into the prefix index of the instance that holds each."""
        table = self._tables.get(request_id)
        done = self._num_published.get(request_id, 0)
        if table is None or num_full <= done:
            return
        for index in range(done, num_full):
            where, block = table.entries[index]
            if where == self.instance_id:
                self._pool.publish(block, keys[index])
            else:
                self._ledger.rmanagers[where].publish_lent(block, keys[index])
        self._num_published[request_id] = num_full

    def lookup(self, key: BlockKey) -> BlockId | None:
        """This pool's cached block named `key`, if any."""
        return self._pool.lookup(key)

    def publish_lent(self, block: BlockId, key: BlockKey) -> None:
        """Enter a block this instance holds for another's request (or a move's destination,
        once copied) into its prefix index."""
        self._pool.publish(block, key)

    def share(self, blocks: list[BlockId], request_id: RequestId, owner: InstanceId) -> None:
        """One more reference to each of these cached blocks, for `owner`'s request."""
        for block in blocks:
            self._pool.share(block, request_id, owner)

    def is_shared(self, block: BlockId) -> bool:
        """Whether more than one request uses the block (then it never moves)."""
        return self._pool.ref_count(block) > 1

    def num_hit_blocks(self, request_id: RequestId) -> int:
        """The leading blocks of the request's table that came from the prefix cache: read
        where they live, never moved."""
        return self._num_hit.get(request_id, 0)

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
        self._num_published.pop(request_id, None)
        self._num_hit.pop(request_id, None)
        if self._remote.pop(request_id, None) is None:
            self._pool.free(table.block_ids(), request_id)
            return
        self._num_borrowed -= len(table) - table.num_blocks_on(self.instance_id)
        by_holder: dict[InstanceId, list[BlockId]] = {}
        for where, block in table.entries:
            by_holder.setdefault(where, []).append(block)
        self._pool.free(by_holder.pop(self.instance_id, []), request_id)
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

    def take_back(self, blocks: list[BlockId], request_id: RequestId,
                  debtor: InstanceId) -> None:
        """Blocks a debtor's request gives back (repayment, or a refused borrow undone); a
        shared one stays with its other users."""
        self._pool.free(blocks, request_id, debtor)

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

    def forget_cached(self, block: BlockId) -> BlockKey | None:
        """Take a block out of the prefix index (its data may have been overwritten by a
        cancelled swap, or a move copied them elsewhere); its holders, if any, keep it.
        Returns its key, if it had one."""
        return self._pool.uncache(block)

    def release(self, blocks: list[BlockId], request_id: RequestId, owner: InstanceId) -> None:
        """Free the sources of `owner`'s request's completed moves (their prefix keys moved
        to the destinations first) or the destinations of cancelled ones."""
        self._pool.free(blocks, request_id, owner)

    # ---- checks ---------------------------------------------------------------------------

    def lent_blocks(self) -> dict[tuple[InstanceId, RequestId], int]:
        """Blocks lent out, per (owner instance, request)."""
        return self._pool.lent_blocks()

    def check_integrity(self) -> None:
        """The pool is consistent; each of its references by this instance's requests is an
        entry of their tables, and the other way round (a shared block is in as many tables
        as it has references); loans stay within the cap."""
        me = self.instance_id
        self._pool.check_integrity()
        self._check_counts()
        own = sorted((b, rid) for rid, t in self._tables.items() for b in t.blocks_on(me))
        held = sorted((b, rid) for b, (rid, owner) in self._pool.all_holders() if owner == me)
        if own != held:
            raise RuntimeError(f"instance {me}: tables hold local blocks {own} but the pool "
                               f"records references {held}")
        if self._pool.num_lent > self.max_lent_blocks:
            raise RuntimeError(f"instance {me}: {self._pool.num_lent} blocks lent, cap "
                               f"{self.max_lent_blocks}")
        published = {rid: n for rid, n in self._num_published.items() if n}
        if not published.keys() <= self._tables.keys() or any(
                n > len(self._tables[rid]) for rid, n in published.items()):
            raise RuntimeError(f"instance {me}: published blocks {published} beyond the tables")

    def holders_of_lent(self) -> list[tuple[BlockId, RequestId, InstanceId]]:
        """(block, request, owner) of every reference to this pool by another instance's
        request (for the ledger's check)."""
        return [(b, rid, owner) for b, (rid, owner) in self._pool.all_holders()
                if owner != self.instance_id]

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
