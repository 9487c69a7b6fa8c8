"""Rebalancer: every decision taken for the cluster as a whole, between two steps.

Per-instance decisions (which requests run, which one gives way when its pool runs short) are
the schedulers'. What needs the whole cluster is decided here, before the schedulers run:

- **Instance loss.** Requests owned by a lost instance are orphans (recomputed elsewhere); a
  running request with blocks on it is preempted (recomputed from its prompt and output).
- **Standstill.** Every running request of the cluster waits for blocks that only another
  running request can free: one of them is preempted, by the same victim policy the schedulers
  use; a lone request that still cannot fit ends with finish_reason "length".
- **Block moves** (our reading of the paper's DGFM), within a per-step budget: swaps that break
  two-instance debt cycles (A holds B's blocks while B holds A's, so each side reads locally),
  recall that brings borrowed blocks home to owners with room (keeping a headroom free for their
  own growth), and reclaims that empty a creditor whose own queue needs the blocks it lent
  (each block goes to the roomiest other instance). Under proactive placement the swaps stay,
  and recall (for owners with no queue only) and reclaims give way to `Placement`
  (placement.py): KV moved off instances whose queue head cannot start, gated by the
  instances' step-time models. `plan_migration` is the same move primitive offered to callers.
  Moves are planned here (destinations reserved), copied by the data plane, then switched by
  `GManager.apply_moves`. Pinned blocks never move (`GManager.pinned`): one shared by several
  requests, or taken by a request from the prefix cache; they are attended where they live.
  A cached block its writer alone uses may move; its prefix key moves to the destination,
  and a swap, applied or cancelled, takes both of its blocks out of the index (overwritten).

Plain Python over ids and Request records; no tensors, no schedulers: decisions are returned
to the engine, which applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from infinillm.cluster.gmanager import GManager
from infinillm.types import BlockMove, InstanceId, Request, RequestId

if TYPE_CHECKING:
    from infinillm.cluster.placement import Placement


def choose_victim(candidates: Sequence[Request]) -> Request:
    """The request to preempt among `candidates` (in arrival order): the one whose recompute
    costs least (fewest computed tokens), the newest on ties. The one victim policy of the
    engine: schedulers and the rebalancer both use it."""
    return min(reversed(candidates), key=lambda r: r.num_computed_tokens)


@dataclass(frozen=True, slots=True)
class Demand:
    """What one instance's queue asks of the cluster before a step, and the load it runs
    (from its scheduler)."""

    keep_free: int = 0  # free blocks not to lend out: the queue head needs them now
    reclaim: int = 0  # lent blocks it wants back to admit its queue head locally
    head_blocks: int = 0  # blocks the queue head needs to start here (0: no queue)
    head_tokens: int = 0  # the queue head's tokens (prompt and output so far)
    num_running: int = 0  # requests in its batch
    kv_tokens: int = 0  # their tokens: the KV its next decode step reads
    longest: RequestId | None = None  # its running request with the most tokens


@dataclass(slots=True)
class InstanceView:
    """The requests of one instance, as the rebalancer sees them before a step."""

    instance_id: InstanceId
    running: Sequence[Request]
    waiting: Sequence[Request]


@dataclass(slots=True)
class Settlement:
    """Request-level decisions for the engine to apply, in this order."""

    orphans: list[Request] = field(default_factory=list)  # owned by lost instances: re-route
    preempt: list[Request] = field(default_factory=list)  # recompute later
    end: list[Request] = field(default_factory=list)  # finish with "length"
    lost: list[InstanceId] = field(default_factory=list)  # forget once the above are applied


class Rebalancer:
    def __init__(self, gmanager: GManager | None, max_moves_per_step: int,
                 recall_headroom: int, placement: Placement | None = None) -> None:
        self.gmanager = gmanager  # None without lending: nothing is ever away from home
        self.max_moves_per_step = max_moves_per_step
        self.recall_headroom = recall_headroom
        self.placement = placement  # None: reactive (recall and reclaims)
        self.num_standstills = 0
        self.num_moves = 0
        # Requests whose blocks a cancelled swap may have overwritten: recomputed when the
        # loss that cancelled it is settled.
        self._overwritten: set[RequestId] = set()

    # ---- requests -------------------------------------------------------------------------

    def settle(self, instances: Sequence[InstanceView], lost: Sequence[InstanceId],
               standstill: bool) -> Settlement:
        """Decisions for lost instances and for a standstill seen in the last step."""
        out = Settlement(lost=list(lost))
        if lost:
            self._settle_loss(instances, set(lost), out)
        elif standstill:
            self._settle_standstill(instances, out)
        return out

    def _settle_loss(self, instances: Sequence[InstanceView], lost: set[InstanceId],
                     out: Settlement) -> None:
        for view in instances:
            if view.instance_id in lost:
                out.orphans += [*view.running, *view.waiting]
        if self.gmanager is None:
            return
        for view in instances:
            if view.instance_id in lost:
                continue
            rm = self.gmanager.rmanagers[view.instance_id]
            out.preempt += [r for r in view.running if r.request_id in self._overwritten
                            or any(rm.holds_blocks_on(r.request_id, i) for i in lost)]
        self._overwritten.clear()

    def _settle_standstill(self, instances: Sequence[InstanceView], out: Settlement) -> None:
        running = sorted((r for v in instances for r in v.running), key=lambda r: r.arrival)
        if not running:
            return
        self.num_standstills += 1
        if len(running) == 1:
            out.end.append(running[0])
        else:
            out.preempt.append(choose_victim(running))

    # ---- block moves ----------------------------------------------------------------------

    def plan_moves(self, demands: dict[InstanceId, Demand],
                   max_moves: int | None = None) -> list[BlockMove]:
        """Refresh the ledger with each instance's demand, then plan this step's moves: swaps,
        recall home, reclaims; at most `max_moves` (default `max_moves_per_step`).
        Destinations are reserved."""
        gm = self.gmanager
        if gm is None:
            return []
        budget = self.max_moves_per_step if max_moves is None else max_moves
        gm.heartbeat_all({i: d.keep_free for i, d in demands.items()})
        moves = self._plan_swaps(budget)
        planned = {(m.request_id, m.index) for m in moves}
        if self.placement is not None:
            moves += self.placement.plan(demands, budget - len(moves), planned)
            idle = [i for i, d in demands.items() if not d.head_blocks]
            return moves + self._plan_recall(budget - len(moves), planned, idle)
        moves += self._plan_recall(budget - len(moves), planned)
        moves += self._plan_reclaims(budget - len(moves),
                                     {(m.request_id, m.index) for m in moves},
                                     {i: d.reclaim for i, d in demands.items()})
        return moves

    def plan_migration(self, owner: InstanceId, request_id: RequestId, index: int,
                       dst: InstanceId) -> BlockMove | None:
        """Move logical block `index` of a request to `dst`; None when `dst` holds it already
        or cannot take it."""
        if self.gmanager is None:
            raise ValueError("migrating blocks needs lending (num_instances > 1, lending=True)")
        return self.gmanager.plan_move(owner, request_id, index, dst)

    def cancel(self, moves: list[BlockMove]) -> None:
        """Give back the destinations reserved for moves that were not carried out (an
        instance was lost during the copy). A swap's destinations are blocks in use, each the
        source of the other move, and some may have been overwritten already: the requests
        whose source is another move's destination are preempted when the loss is settled."""
        self.gmanager.cancel_moves(moves)
        destinations = {m.dst for m in moves}
        self._overwritten.update(m.request_id for m in moves if m.src in destinations)

    def commit(self, moves: list[BlockMove]) -> None:
        """Switch the control plane to moves the data plane has copied."""
        if moves:
            self.gmanager.apply_moves(moves)
            self.num_moves += len(moves)

    def _plan_swaps(self, budget: int) -> list[BlockMove]:
        gm = self.gmanager
        moves: list[BlockMove] = []
        for a, b in sorted(gm.debts):
            if a > b or (b, a) not in gm.debts:
                continue
            # a's blocks held on b, b's held on a; shared ones stay where they are
            ours = (e for e in gm.rmanagers[a].remote_entries(b) if not gm.pinned(a, *e))
            theirs = (e for e in gm.rmanagers[b].remote_entries(a) if not gm.pinned(b, *e))
            for (ra, ia, on_b), (rb, ib, on_a) in zip(ours, theirs):
                if len(moves) + 2 > budget:
                    return moves
                moves.append(BlockMove(ra, a, ia, on_b, on_a))
                moves.append(BlockMove(rb, b, ib, on_a, on_b))
        return moves

    def _plan_recall(self, budget: int, planned: set[tuple[RequestId, int]],
                     owners: Sequence[InstanceId] | None = None) -> list[BlockMove]:
        """Owners (every one, or `owners`) with room above the headroom bring borrowed blocks
        home."""
        gm = self.gmanager
        moves: list[BlockMove] = []
        for owner in gm.rmanagers if owners is None else owners:
            rm = gm.rmanagers[owner]
            if budget <= 0:
                break
            room = rm.num_free_blocks - self.recall_headroom
            if room <= 0 or not rm.num_borrowed_blocks():
                continue  # checked before walking any table: most owners have nothing to do
            for rid, index, where in rm.remote_entries():
                if budget <= 0 or room <= 0:
                    break
                if (rid, index) in planned or gm.pinned(owner, rid, index, where):
                    continue
                move = gm.plan_move(owner, rid, index, owner)
                if move is None:
                    break
                moves.append(move)
                budget -= 1
                room -= 1
        return moves

    def _plan_reclaims(self, budget: int, planned: set[tuple[RequestId, int]],
                       reclaim: dict[InstanceId, int]) -> list[BlockMove]:
        """A creditor whose own queue needs blocks it has lent gets them back: each lent block
        moves to the instance with the most room (never back to the creditor), the borrower's
        own pool included."""
        gm = self.gmanager
        moves: list[BlockMove] = []
        for creditor in gm.rmanagers:
            wanted = reclaim.get(creditor, 0)
            if wanted <= 0:
                continue
            if budget <= 0:
                break
            # Only owners that owe this creditor hold blocks on it (the ledger equals the
            # tables); planning reserves destinations but changes no table and no debt.
            for owner in [o for o in gm.rmanagers if (o, creditor) in gm.debts]:
                for rid, index, where in gm.rmanagers[owner].remote_entries(creditor):
                    if wanted <= 0 or budget <= 0:
                        break
                    if (rid, index) in planned or gm.pinned(owner, rid, index, where):
                        continue
                    dst = self._roomiest(exclude=creditor, owner=owner)
                    move = None if dst is None else gm.plan_move(owner, rid, index, dst)
                    if move is None:
                        return moves
                    moves.append(move)
                    wanted -= 1
                    budget -= 1
        return moves

    def _roomiest(self, exclude: InstanceId, owner: InstanceId) -> InstanceId | None:
        """The instance other than `exclude` that can take one more block of `owner`'s."""
        gm = self.gmanager

        def room(i: InstanceId) -> int:
            if i == owner:
                return gm.rmanagers[i].num_free_blocks - self.recall_headroom
            return gm.lendable_now(i)

        best = max((i for i in gm.rmanagers if i != exclude), key=room, default=None)
        return best if best is not None and room(best) > 0 else None
