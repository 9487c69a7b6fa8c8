"""The records the control plane exchanges: grants of borrowed blocks (block moves are
`types.BlockMove`, shared with the data plane)."""

from __future__ import annotations

from dataclasses import dataclass

from infinillm.types import InstanceId


@dataclass(frozen=True, slots=True)
class Grant:
    """A reservation on `creditor` for `num_blocks`, made by the GManager before any block is
    taken, so that a stale view of free memory never oversubscribes a creditor."""

    creditor: InstanceId
    num_blocks: int
