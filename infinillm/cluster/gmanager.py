"""GManager: the global debt ledger, creditor selection and recall planning.

The ledger holds, per instance, the lendable blocks last reported by its heartbeat (free blocks
within the lending cap and after the own queue's needs), and the debts: for each (debtor,
creditor) pair, how many blocks each request of the debtor holds on the creditor. Borrowing goes
reserve -> lend -> record: the GManager first reserves blocks on creditors against its view
(taking them out of the view at once, so a stale view never promises the same blocks twice),
then the creditors' RManagers lend them from their own pools, refusing what they no longer have;
a refusal cancels the whole borrow.

Recall (our reading of the paper's DGFM) runs between steps, with a per-step budget of moved
blocks: first it breaks two-instance cycles in the debt graph (A holds B's blocks while B holds
A's) by swapping blocks, so each side's request reads locally; then owners with free room bring
borrowed blocks home, keeping `recall_headroom` blocks free for their own growth.
"""

from __future__ import annotations

from infinillm.cluster.messages import Grant
from infinillm.cluster.rmanager import RManager
from infinillm.types import BlockId, BlockMove, InstanceId, RequestId


class GManager:
    def __init__(self, recall_headroom: int = 0) -> None:
        self.rmanagers: dict[InstanceId, RManager] = {}
        self.recall_headroom = recall_headroom
        self._lendable: dict[InstanceId, int] = {}
        self.debts: dict[tuple[InstanceId, InstanceId], dict[RequestId, int]] = {}
        self.num_refused_loans = 0

    def register(self, rmanager: RManager) -> None:
        self.rmanagers[rmanager.instance_id] = rmanager
        rmanager.gmanager = self
        self.heartbeat(rmanager.instance_id)

    def unregister(self, instance: InstanceId) -> None:
        """Forget a lost instance; it must hold no loans and owe nothing any more."""
        if any(instance in pair for pair in self.debts):
            raise RuntimeError(f"instance {instance} still has debts: {self.debt_matrix()}")
        del self.rmanagers[instance], self._lendable[instance]

    def heartbeat(self, instance: InstanceId) -> None:
        """Refresh the view of one instance's free and lendable blocks."""
        rm = self.rmanagers[instance]
        self._lendable[instance] = rm.num_lendable_blocks

    def heartbeat_all(self) -> None:
        for instance in self.rmanagers:
            self.heartbeat(instance)

    def lendable_elsewhere(self, instance: InstanceId) -> int:
        """What the other instances may lend, by the current view."""
        return sum(n for i, n in self._lendable.items() if i != instance)

    # ---- borrowing ------------------------------------------------------------------------

    def reserve(self, debtor: InstanceId, request_id: RequestId, n: int) -> list[Grant] | None:
        """Reserve `n` blocks on creditors other than `debtor`; None if the view has not enough.

        Policy: a creditor already holding this request's blocks first (fewer holders means
        fewer remote calls per layer), then the most lendable; a loan is split only when no
        single creditor can serve it."""
        holding = {c for (d, c), reqs in self.debts.items() if d == debtor and request_id in reqs}
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
            self._lendable[g.creditor] -= g.num_blocks
        return grants

    def cancel(self, grants: list[Grant]) -> None:
        for g in grants:
            self._lendable[g.creditor] += g.num_blocks

    def borrow(self, debtor: InstanceId, request_id: RequestId,
               n: int) -> list[tuple[InstanceId, list[BlockId]]] | None:
        """Reserve, then take `n` blocks from creditors for `request_id`; all or nothing."""
        grants = self.reserve(debtor, request_id, n)
        if grants is None:
            return None
        taken: list[tuple[InstanceId, list[BlockId]]] = []
        for g in grants:
            blocks = self.rmanagers[g.creditor].lend(request_id, g.num_blocks, debtor)
            if blocks is None:  # the view was stale: undo everything
                self.num_refused_loans += 1
                for creditor, got in taken:
                    self.rmanagers[creditor].pool.free(got)
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
        self.rmanagers[creditor].pool.free(blocks)
        self._add_debt(debtor, creditor, request_id, -len(blocks))
        self.heartbeat(creditor)

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

    # ---- recall ---------------------------------------------------------------------------

    def plan_recall(self, max_blocks: int) -> list[BlockMove]:
        """Moves that bring lent blocks home, at most `max_blocks` of them. Destination blocks
        of bring-home moves are allocated here, so the plan is a reservation."""
        moves = self._plan_swaps(max_blocks)
        budget = max_blocks - len(moves)
        swapped = {(m.request_id, m.index) for m in moves}
        for owner, rm in self.rmanagers.items():
            room = rm.num_free_blocks - self.recall_headroom
            for rid, index, _ in self._remote_entries(owner):
                if budget <= 0 or room <= 0:
                    break
                if (rid, index) in swapped:
                    continue
                move = self.plan_move(owner, rid, index, owner)
                if move is None:
                    break
                moves.append(move)
                budget -= 1
                room -= 1
        moves += self._plan_reclaims(budget, {(m.request_id, m.index) for m in moves})
        return moves

    def _plan_reclaims(self, budget: int, planned: set[tuple[RequestId, int]]) -> list[BlockMove]:
        """A creditor whose own queue needs blocks it has lent (`RManager.reclaim_wanted`)
        gets them back: each lent block moves to the instance with the most lendable room
        (never back to the creditor), the borrower's own pool included."""
        moves: list[BlockMove] = []
        for creditor, crm in self.rmanagers.items():
            wanted = crm.reclaim_wanted
            for owner in self.rmanagers:
                if owner == creditor:
                    continue
                for rid, index, _ in list(self._remote_entries(owner, creditor)):
                    if wanted <= 0 or budget <= 0:
                        break
                    if (rid, index) in planned:
                        continue
                    dst = self._roomiest(exclude=creditor, owner=owner)
                    move = None if dst is None else self.plan_move(owner, rid, index, dst)
                    if move is None:
                        return moves
                    moves.append(move)
                    wanted -= 1
                    budget -= 1
        return moves

    def _roomiest(self, exclude: InstanceId, owner: InstanceId) -> InstanceId | None:
        """The instance other than `exclude` that can take one more block of `owner`'s."""
        def room(i: InstanceId) -> int:
            rm = self.rmanagers[i]
            if i == owner:
                return rm.num_free_blocks - self.recall_headroom
            return rm.num_lendable_blocks
        best = max((i for i in self.rmanagers if i != exclude), key=room, default=None)
        return best if best is not None and room(best) > 0 else None

    def plan_move(self, owner: InstanceId, request_id: RequestId, index: int,
                  dst: InstanceId) -> BlockMove | None:
        """The migration primitive: reserve a block on `dst` for logical block `index` of a
        request, as a move to execute (fabric copy, then `apply_moves`). None when `dst`
        already holds it, or cannot take it (full, or its lending cap)."""
        src = self.rmanagers[owner].tables[request_id].entries[index]
        if src[0] == dst:
            return None
        rm = self.rmanagers[dst]
        if dst == owner:
            blocks = rm.pool.allocate(1, request_id)
        else:
            blocks = rm.lend(request_id, 1, owner)
        if blocks is None:
            return None
        return BlockMove(request_id, owner, index, src, (dst, blocks[0]))

    def _remote_entries(self, owner: InstanceId, creditor: InstanceId | None = None):
        """(request, logical index, (holder, block)) of an owner's blocks held elsewhere."""
        for rid, table in self.rmanagers[owner].tables.items():
            for index, (holder, block) in enumerate(table.entries):
                if holder != owner and (creditor is None or holder == creditor):
                    yield rid, index, (holder, block)

    def _plan_swaps(self, max_blocks: int) -> list[BlockMove]:
        moves: list[BlockMove] = []
        for a, b in sorted(self.debts):
            if a > b or (b, a) not in self.debts:
                continue
            ours = list(self._remote_entries(a, b))  # a's blocks held on b
            theirs = list(self._remote_entries(b, a))  # b's blocks held on a
            for (ra, ia, on_b), (rb, ib, on_a) in zip(ours, theirs):
                if len(moves) + 2 > max_blocks:
                    return moves
                moves.append(BlockMove(ra, a, ia, on_b, on_a))
                moves.append(BlockMove(rb, b, ib, on_a, on_b))
        return moves

    def apply_moves(self, moves: list[BlockMove]) -> None:
        """Switch tables, pools and the ledger after the data plane copied every move."""
        destinations = {m.dst for m in moves}
        for m in moves:
            self.rmanagers[m.owner].tables[m.request_id].entries[m.index] = m.dst
            dst_pool = self.rmanagers[m.dst[0]].pool
            if dst_pool.holder(m.dst[1]) != (m.request_id, m.owner):
                dst_pool.reassign(m.dst[1], m.request_id, m.owner)
            if m.src[0] != m.owner:
                self._add_debt(m.owner, m.src[0], m.request_id, -1)
            if m.dst[0] != m.owner:
                self._add_debt(m.owner, m.dst[0], m.request_id, 1)
        for m in moves:
            if m.src not in destinations:
                self.rmanagers[m.src[0]].pool.free([m.src[1]])
        self.heartbeat_all()

    # ---- checks ---------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """The ledger equals the pools and the tables; every RManager is consistent."""
        for rm in self.rmanagers.values():
            rm.check_integrity()
        from_pools: dict[tuple[InstanceId, InstanceId], dict[RequestId, int]] = {}
        for creditor, rm in self.rmanagers.items():
            for (owner, rid), n in rm.pool.lent_blocks().items():
                from_pools.setdefault((owner, creditor), {})[rid] = n
        if from_pools != self.debts:
            raise RuntimeError(f"ledger {self.debts} differs from the pools {from_pools}")
        from_tables: dict[tuple[InstanceId, InstanceId], dict[RequestId, int]] = {}
        for owner in self.rmanagers:
            for rid, _, (holder, _) in self._remote_entries(owner):
                reqs = from_tables.setdefault((owner, holder), {})
                reqs[rid] = reqs.get(rid, 0) + 1
        if from_tables != self.debts:
            raise RuntimeError(f"ledger {self.debts} differs from the tables {from_tables}")
