"""Proactive KV placement: the greedy round of Infinite-LLM v2, planned by the rebalancer
before each step when `placement="proactive"`.

Reactive lending borrows when a request runs out of blocks (admitting a request by what
creditors may lend, too) and recalls blocks home when the owner has room again; under load the
two fight (a recalled block makes room that the next admission fills, which borrows again).
Proactive placement instead decides where KV lives so that every instance can run the batch it
should:

- A **debtor** is an instance whose queue head cannot start for want of local blocks (admission
  is local first under proactive placement). Debtors go smallest batch first: a small batch
  pays the most for every weight it reads, so one more request there gains the most.
- A **creditor** is an instance with no queue and free blocks beyond its own batch's growth (a
  block per running request, the blocks its queue head keeps).
- For each debtor the round moves KV away until its head fits: first blocks that other
  instances' requests hold on it (home when the owner has room, else to the roomiest
  creditor), then blocks of its own longest request, oldest first (full blocks only), to the
  creditor with the most room, as long as the performance models predict a gain: tokens per
  second of debtor and creditor together, with the debtor running one more request and reading
  less KV, the creditor reading the moved KV, and one more exchange per step when the request
  had no blocks on that creditor yet. Without fitted models the move is made: it lets a
  waiting request start on an instance that has room for it nowhere else.
- Every move reserves its destination first (`GManager.plan_move`); a refusal ends the
  debtor's turn. At most `budget` blocks per round (the rebalancer's per-step budget).

Owners with no queue and room above the recall headroom bring their blocks home (fewer
exchanges per step); an owner with a queue never does, so blocks do not travel back and forth.
That part is the rebalancer's recall, limited to those owners.
"""

from __future__ import annotations

from collections.abc import Mapping

from infinillm.cluster.gmanager import GManager
from infinillm.cluster.perf_model import StepFeatures, StepTimeModel
from infinillm.cluster.rebalancer import Demand
from infinillm.types import BlockMove, InstanceId, RequestId


class Placement:
    def __init__(self, gmanager: GManager, models: Mapping[InstanceId, StepTimeModel],
                 block_size: int) -> None:
        self.gmanager = gmanager
        self.models = models
        self.block_size = block_size
        self.num_moves = 0  # blocks moved by the round since start
        self.num_refused = 0  # moves the models predicted no gain for

    def plan(self, demands: Mapping[InstanceId, Demand], budget: int,
             planned: set[tuple[RequestId, int]]) -> list[BlockMove]:
        """This round's moves, destinations reserved (module docstring)."""
        gm = self.gmanager
        moves: list[BlockMove] = []
        debtors = sorted((i for i, d in demands.items()
                          if d.head_blocks > gm.rmanagers[i].num_free_blocks),
                         key=lambda i: (demands[i].num_running, i))
        for debtor in debtors:
            if budget - len(moves) <= 0:
                break
            short = demands[debtor].head_blocks - gm.rmanagers[debtor].num_free_blocks
            wanted = min(short, budget - len(moves))
            got = self._move_lent(debtor, demands, wanted, planned)
            got += self._move_own(debtor, demands, wanted - len(got), planned)
            moves += got
        self.num_moves += len(moves)
        return moves

    def _room(self, creditor: InstanceId, demands: Mapping[InstanceId, Demand]) -> int:
        """Blocks `creditor` may take for others now: none while it has a queue."""
        d = demands.get(creditor, Demand())
        if d.head_blocks:
            return 0
        return self.gmanager.lendable_now(creditor) - d.num_running

    def _roomiest(self, exclude: InstanceId, demands: Mapping[InstanceId, Demand]
                  ) -> InstanceId | None:
        best = max((c for c in self.gmanager.rmanagers if c != exclude),
                   key=lambda c: (self._room(c, demands), -c), default=None)
        return best if best is not None and self._room(best, demands) > 0 else None

    def _move_lent(self, debtor: InstanceId, demands: Mapping[InstanceId, Demand], wanted: int,
                   planned: set[tuple[RequestId, int]]) -> list[BlockMove]:
        """Blocks other owners' requests hold on `debtor`: home where the owner has room (it
        then reads them locally), else to the roomiest creditor."""
        gm = self.gmanager
        moves: list[BlockMove] = []
        for owner in [o for o in gm.rmanagers if (o, debtor) in gm.debts]:
            for rid, index, where in list(gm.rmanagers[owner].remote_entries(debtor)):
                if len(moves) >= wanted:
                    return moves
                if (rid, index) in planned or gm.pinned(owner, rid, index, where):
                    continue
                home = demands.get(owner, Demand())
                rm = gm.rmanagers[owner]
                dst = owner if (not home.head_blocks and rm.num_free_blocks
                                > home.num_running + 1) else self._roomiest(debtor, demands)
                move = None if dst is None else gm.plan_move(owner, rid, index, dst)
                if move is None:
                    return moves
                moves.append(move)
                planned.add((rid, index))
        return moves

    def _move_own(self, debtor: InstanceId, demands: Mapping[InstanceId, Demand], wanted: int,
                  planned: set[tuple[RequestId, int]]) -> list[BlockMove]:
        """Full local blocks of the debtor's longest request, oldest first, to the creditor
        with the most room, when the models predict a gain."""
        d = demands[debtor]
        if wanted <= 0 or d.longest is None:
            return []
        creditor = self._roomiest(debtor, demands)
        if creditor is None:
            return []
        rm = self.gmanager.rmanagers[debtor]
        limit = min(wanted, self._room(creditor, demands))
        entries = rm.block_view(d.longest)
        indices: list[int] = []
        for i in range(len(entries) - 1):  # the last block is still being written
            if len(indices) >= limit:
                break
            if (entries[i][0] == debtor and (d.longest, i) not in planned
                    and not self.gmanager.pinned(debtor, d.longest, i, entries[i])):
                indices.append(i)
        n = len(indices)
        if n <= 0:
            return []
        new_holder = creditor not in rm.holder_counts(d.longest)
        if not self._gains(debtor, creditor, demands, n * self.block_size, new_holder):
            self.num_refused += 1
            return []
        moves: list[BlockMove] = []
        for index in indices[:n]:
            move = self.gmanager.plan_move(debtor, d.longest, index, creditor)
            if move is None:
                break
            moves.append(move)
            planned.add((d.longest, index))
        return moves

    def _gains(self, debtor: InstanceId, creditor: InstanceId,
               demands: Mapping[InstanceId, Demand], moved_tokens: int, new_holder: bool) -> bool:
        """Whether debtor and creditor together produce more tokens per second after the move
        (and the debtor's queue head starting), by their performance models."""
        md, mc = self.models.get(debtor), self.models.get(creditor)
        if md is None or mc is None or not (md.fitted and mc.fitted):
            return True
        d, c = demands[debtor], demands.get(creditor, Demand())
        before_d = StepFeatures(d.num_running, d.kv_tokens)
        after_d = before_d.plus(1, d.head_tokens - moved_tokens, int(new_holder))
        before_c = StepFeatures(c.num_running, c.kv_tokens)
        after_c = before_c.plus(0, moved_tokens)
        rate_before = _rate(md, before_d) + _rate(mc, before_c)
        rate_after = _rate(md, after_d) + _rate(mc, after_c)
        return rate_after > rate_before


def _rate(model: StepTimeModel, features: StepFeatures) -> float:
    """Decode tokens per second of a batch (0 for an empty one)."""
    if features.num_tokens == 0:
        return 0.0
    seconds = model.predict(features)
    return features.num_tokens / seconds if seconds else 0.0
