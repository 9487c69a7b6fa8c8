"""BlockTable: one request's logical blocks, in position order, as (instance, block) ids.

Logical block i holds positions [i * block_size, (i + 1) * block_size). With one instance every
entry is local; with lending, entries may name the instance that holds a borrowed block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infinillm.types import BlockId, InstanceId


@dataclass(slots=True)
class BlockTable:
    entries: list[tuple[InstanceId, BlockId]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, instance: InstanceId, blocks: list[BlockId]) -> None:
        self.entries.extend((instance, b) for b in blocks)

    def block_ids(self) -> list[BlockId]:
        return [b for _, b in self.entries]

    def blocks_on(self, instance: InstanceId) -> list[BlockId]:
        return [b for i, b in self.entries if i == instance]

    def instances(self) -> set[InstanceId]:
        return {i for i, _ in self.entries}


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` positions."""
    return -(-num_tokens // block_size)
