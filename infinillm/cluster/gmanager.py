"""GManager: the global debt ledger and creditor selection.

The ledger holds, per instance, the lendable blocks last reported by its heartbeat (free blocks
within the lending cap, after the blocks its own queue needs), and the debts: for each (debtor,
creditor) pair, how many blocks each request of the debtor holds on the creditor. Borrowing goes
reserve -> lend -> record: the GManager first reserves blocks on creditors against its view
(taking them out of the view at once, so a stale view never promises the same blocks twice),
then the creditors' RManagers lend them from their own pools, refusing what they no longer have;
a refusal cancels the whole borrow.

The GManager talks to RManagers only through their request-level calls. How many blocks each
instance keeps for its own queue is an argument of `heartbeat_all`, given by the engine from the
schedulers once per step. Block moves are planned by the rebalancer (rebalancer.py) with
`plan_move` and switched here by `apply_moves` once the data plane has copied them.

Prefix caching: a request that reuses cached blocks of another instance in place (`share`) owes
them like borrowed ones: the debt is a reference, repaid when the request frees its table, and
the creditor's block stays cached for others. A block used by more than one request, or taken
from the prefix cache, is `pinned`: never moved.
"""

from __future__ import annotations

from infinillm.cluster.messages import Grant
from infinillm.cluster.rmanager import RManager
from infinillm.types import BlockId, BlockMove, InstanceId, RequestId

Debts = dict[tuple[InstanceId, InstanceId], dict[RequestId, int]]


class GManager:
    def __init__(self) -> None:
        self.rmanagers: dict[InstanceId, RManager] = {}
        self._lendable: dict[InstanceId, int] = {}
        self._lendable_total = 0  # sum of _lendable, kept as it changes (asked per admission)
        self._keep_free: dict[InstanceId, int] = {}
        self.debts: Debts = {}
        self.num_refused_loans = 0

    def register(self, rmanager: RManager) -> None:
        self.rmanagers[rmanager.instance_id] = rmanager
        self._keep_free[rmanager.instance_id] = 0
        self.heartbeat(rmanager.instance_id)

    def unregister(self, instance: InstanceId) -> None:
        """Forget a lost instance; it must hold no loans and owe nothing any more."""
        if any(instance in pair for pair in self.debts):
            raise RuntimeError(f"instance {instance} still has debts: {self.debt_matrix()}")
        self._lendable_total -= self._lendable[instance]
        del self.rmanagers[instance], self._lendable[instance], self._keep_free[instance]

    def heartbeat(self, instance: InstanceId) -> None:
        """Refresh the view of one instance's lendable blocks."""
        self._set_lendable(instance, self.lendable_now(instance))

    def _set_lendable(self, instance: InstanceId, n: int) -> None:
        self._lendable_total += n - self._lendable.get(instance, 0)
        self._lendable[instance] = n

    def heartbeat_all(self, keep_free: dict[InstanceId, int] | None = None) -> None:
        """Refresh every view; `keep_free` (blocks each instance's queue needs now, not to be
        lent) replaces the last one given."""
        if keep_free is not None:
            self._keep_free.update(keep_free)
        for instance in self.rmanagers:
            self.heartbeat(instance)

    def lendable_now(self, instance: InstanceId) -> int:
        """What `instance` may lend at this moment (not the reserved view)."""
        return self.rmanagers[instance].num_lendable_blocks(self._keep_free[instance])

    def lendable_elsewhere(self, instance: InstanceId) -> int:
        """What the other instances may lend, by the current view."""
        return self._lendable_total - self._lendable.get(instance, 0)

    # ---- borrowing ------------------------------------------------------------------------

    def reserve(self, debtor: InstanceId, request_id: RequestId, n: int) -> list[Grant] | None:
        """Reserve `n` blocks on creditors other than `debtor`; None if the view has not enough.

        Policy: a creditor already holding this request's blocks first (fewer holders means
        fewer remote calls per layer), then the most lendable; a loan is split only when no
        single creditor can serve it."""
        holding = {c for c in self._lendable
                   if request_id in self.debts.get((debtor, c), ())}  # O(instances), not O(debts)
        order = sorted((c for c in self._lendable if c != debtor and self._lendable[c] > 0),
                       key=lambda c: (c in holding, self._lendable[c], -c), reverse=True)
        if sum(self._lendable[c] for c in order) < n:
            return None
        whole = [c for c in order if self._lendable[c] >= n]
        grants, left = [], n
        for creditor in whole[:1] or order:
            take = min(left, self._lendable[creditor])
            grants.append(Grant(creditor, take))
            left -= take
            if left == 0:
                break
        for g in grants:
            self._set_lendable(g.creditor, self._lendable[g.creditor] - g.num_blocks)
        return grants

    def cancel(self, grants: list[Grant]) -> None:
        for g in grants:
            self._set_lendable(g.creditor, self._lendable[g.creditor] + g.num_blocks)

    def borrow(self, debtor: InstanceId, request_id: RequestId,
               n: int) -> list[tuple[InstanceId, list[BlockId]]] | None:
        """Reserve, then take `n` blocks from creditors for `request_id`; all or nothing."""
        grants = self.reserve(debtor, request_id, n)
        if grants is None:
            return None
        taken: list[tuple[InstanceId, list[BlockId]]] = []
        for g in grants:
            blocks = self.rmanagers[g.creditor].lend(request_id, g.num_blocks, debtor,
                                                     self._keep_free[g.creditor])
            if blocks is None:  # the view was stale: undo everything
                self.num_refused_loans += 1
                for creditor, got in taken:
                    self.rmanagers[creditor].take_back(got, request_id, debtor)
                self.cancel(grants)
                for c in {g.creditor for g in grants}:
                    self.heartbeat(c)
                return None
            taken.append((g.creditor, blocks))
        for creditor, blocks in taken:
            self._add_debt(debtor, creditor, request_id, len(blocks))
        return taken

    def repay(self, debtor: InstanceId, creditor: InstanceId, request_id: RequestId,
              blocks: list[BlockId]) -> None:
        """A request of `debtor` gives back its blocks on `creditor`, which may lend them again
        at once (a preemption that frees borrowed blocks must not leave the view short)."""
        self.rmanagers[creditor].take_back(blocks, request_id, debtor)
        self._add_debt(debtor, creditor, request_id, -len(blocks))
        self.heartbeat(creditor)

    def share(self, debtor: InstanceId, creditor: InstanceId, request_id: RequestId,
              blocks: list[BlockId]) -> None:
        """A request of `debtor` references cached blocks of `creditor` in place (a prefix
        hit): recorded as a debt like a loan, repaid the same way, but no block is taken
        from the free ones unless it was evictable (the view is refreshed for that)."""
        self.rmanagers[creditor].share(blocks, request_id, debtor)
        self._add_debt(debtor, creditor, request_id, len(blocks))
        self.heartbeat(creditor)

    def pinned(self, owner: InstanceId, request_id: RequestId, index: int,
               location: tuple[InstanceId, BlockId]) -> bool:
        """Whether logical block `index` of `owner`'s request (at `location`) must stay where
        it is: a block more than one request uses, or one the request took from the prefix
        cache (attended in place, never copied)."""
        return (index < self.rmanagers[owner].num_hit_blocks(request_id)
                or self.rmanagers[location[0]].is_shared(location[1]))

    def _add_debt(self, debtor: InstanceId, creditor: InstanceId, request_id: RequestId,
                  n: int) -> None:
        reqs = self.debts.setdefault((debtor, creditor), {})
        reqs[request_id] = reqs.get(request_id, 0) + n
        if reqs[request_id] == 0:
            del reqs[request_id]
        if not reqs:
            del self.debts[debtor, creditor]

    def debt_matrix(self) -> dict[tuple[InstanceId, InstanceId], int]:
        """Blocks owed, per (debtor, creditor)."""
        return {pair: sum(reqs.values()) for pair, reqs in self.debts.items()}

    # ---- block moves ----------------------------------------------------------------------

    def plan_move(self, owner: InstanceId, request_id: RequestId, index: int,
                  dst: InstanceId) -> BlockMove | None:
        """The migration primitive: reserve a block on `dst` for logical block `index` of a
        request, as a move to execute (data-plane copy, then `apply_moves`). None when `dst`
        already holds it, cannot take it (full, or its lending cap), or the block is pinned
        (shared, or taken from the prefix cache: read where it is)."""
        src = self.rmanagers[owner].block_location(request_id, index)
        if src[0] == dst or self.pinned(owner, request_id, index, src):
            return None
        block = self.rmanagers[dst].claim(request_id, owner, self._keep_free[dst])
        if block is None:
            return None
        return BlockMove(request_id, owner, index, src, (dst, block))

    def apply_moves(self, moves: list[BlockMove]) -> None:
        """Switch tables, pools and the ledger after the data plane copied every move. A
        source in the prefix index passes its key to its destination, so later requests share
        the copy the request now uses (at home, after a recall); a swapped block leaves the
        index, its data overwritten."""
        destinations = {m.dst for m in moves}
        for m in moves:
            self.rmanagers[m.owner].set_block(m.request_id, m.index, m.dst)
            self.rmanagers[m.dst[0]].hand_over(m.dst[1], m.request_id, m.owner)
            if m.src[0] != m.owner:
                self._add_debt(m.owner, m.src[0], m.request_id, -1)
            if m.dst[0] != m.owner:
                self._add_debt(m.owner, m.dst[0], m.request_id, 1)
        for m in moves:
            if m.src not in destinations:  # a swapped source is another move's destination
                key = self.rmanagers[m.src[0]].forget_cached(m.src[1])
                if key is not None:
                    self.rmanagers[m.dst[0]].publish_lent(m.dst[1], key)
                self.rmanagers[m.src[0]].release([m.src[1]], m.request_id, m.owner)
        self.heartbeat_all()

    def cancel_moves(self, moves: list[BlockMove]) -> None:
        """Release the destinations `plan_move` reserved, for moves never applied. A swap's
        destination is another move's source, still in use and never reserved; the copy may
        have overwritten it, so it leaves the prefix index (as when the swap is applied), and
        its request, preempted, frees it to the free list, not the cache."""
        sources = {m.src for m in moves}
        for m in moves:
            if m.dst in sources:
                self.rmanagers[m.dst[0]].forget_cached(m.dst[1])
            else:
                self.rmanagers[m.dst[0]].release([m.dst[1]], m.request_id, m.owner)
        self.heartbeat_all()

    # ---- checks ---------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """The ledger equals the pools and the tables; every RManager is consistent."""
        for rm in self.rmanagers.values():
            rm.check_integrity()
        if self._lendable_total != sum(self._lendable.values()):
            raise RuntimeError(f"lendable view {self._lendable} sums to "
                               f"{sum(self._lendable.values())}, total says "
                               f"{self._lendable_total}")
        from_pools: Debts = {}
        for creditor, rm in self.rmanagers.items():
            for (owner, rid), n in rm.lent_blocks().items():
                from_pools.setdefault((owner, creditor), {})[rid] = n
        if from_pools != self.debts:
            raise RuntimeError(f"ledger {self.debts} differs from the pools {from_pools}")
        from_tables: Debts = {}
        for owner, rm in self.rmanagers.items():
            for rid, _, (holder, _) in rm.remote_entries():
                reqs = from_tables.setdefault((owner, holder), {})
                reqs[rid] = reqs.get(rid, 0) + 1
        if from_tables != self.debts:
            raise RuntimeError(f"ledger {self.debts} differs from the tables {from_tables}")
        # Block by block: every reference to a pool by another instance's request is an entry
        # of that request's table (shared blocks once per table), and the other way round.
        held = sorted((c, b, rid, owner) for c, rm in self.rmanagers.items()
                      for b, rid, owner in rm.holders_of_lent())
        tables = sorted((holder, b, rid, owner) for owner, rm in self.rmanagers.items()
                        for rid, _, (holder, b) in rm.remote_entries())
        if held != tables:
            raise RuntimeError(f"references held by the pools {held} differ from the tables' "
                               f"remote entries {tables}")
