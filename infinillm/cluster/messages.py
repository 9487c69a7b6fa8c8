"""The records the control plane exchanges: grants of borrowed blocks and block moves."""

from __future__ import annotations

from dataclasses import dataclass

from infinillm.types import BlockId, InstanceId, RequestId


@dataclass(frozen=True, slots=True)
class Grant:
    """A reservation on `creditor` for `num_blocks`, made by the GManager before any block is
    taken, so that a stale view of free memory never oversubscribes a creditor."""

    creditor: InstanceId
    num_blocks: int


@dataclass(frozen=True, slots=True)
class BlockMove:
    """Move logical block `index` of `request_id` (owned by `owner`) from `src` to `dst`.

    Moves are executed in two phases: the data plane copies every source to its destination
    (all reads before any write, so a set of moves may swap blocks), then the control plane
    switches the tables. No step runs in between, so a block is never read mid-move."""

    request_id: RequestId
    owner: InstanceId
    index: int
    src: tuple[InstanceId, BlockId]
    dst: tuple[InstanceId, BlockId]
