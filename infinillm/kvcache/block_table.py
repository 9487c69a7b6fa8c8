"""BlockTable: one request's logical blocks, in position order, as (instance, block) ids.

Logical block i holds positions [i * block_size, (i + 1) * block_size). With one instance every
entry is local; with lending, entries may name the instance that holds a borrowed block.

Besides the entries, a table keeps how many of its blocks each holder instance has (`holders`,
only counts > 0), updated by `append` and `set`, so that "which instances hold this request's
blocks" and "how many on X" cost O(holders), not O(blocks): the control plane asks them every
step for every request, and a long request has thousands of blocks. Change a table only through
`append` and `set`; `entries` may be read (and is handed out as a view for one step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infinillm.types import BlockId, InstanceId

Location = tuple[InstanceId, BlockId]


@dataclass(slots=True)
class BlockTable:
    entries: list[Location] = field(default_factory=list)
    holders: dict[InstanceId, int] = field(default_factory=dict)  # blocks per holder, all > 0

    def __post_init__(self) -> None:
        if self.entries and not self.holders:
            for instance, _ in self.entries:
                self.holders[instance] = self.holders.get(instance, 0) + 1

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, instance: InstanceId, blocks: list[BlockId]) -> None:
        if not blocks:
            return
        self.entries.extend((instance, b) for b in blocks)
        self.holders[instance] = self.holders.get(instance, 0) + len(blocks)

    def set(self, index: int, location: Location) -> None:
        """Point logical block `index` at `location` (a block move)."""
        old = self.entries[index][0]
        self.entries[index] = location
        left = self.holders[old] - 1
        if left:
            self.holders[old] = left
        else:
            del self.holders[old]
        self.holders[location[0]] = self.holders.get(location[0], 0) + 1

    def block_ids(self) -> list[BlockId]:
        return [b for _, b in self.entries]

    def blocks_on(self, instance: InstanceId) -> list[BlockId]:
        if instance not in self.holders:
            return []
        if len(self.holders) == 1:
            return self.block_ids()
        return [b for i, b in self.entries if i == instance]

    def num_blocks_on(self, instance: InstanceId) -> int:
        return self.holders.get(instance, 0)

    def instances(self) -> set[InstanceId]:
        return set(self.holders)

    def held_elsewhere(self, instance: InstanceId) -> bool:
        """Whether an instance other than `instance` holds any of the blocks."""
        return len(self.holders) > 1 or (bool(self.holders) and instance not in self.holders)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` positions."""
    return -(-num_tokens // block_size)
