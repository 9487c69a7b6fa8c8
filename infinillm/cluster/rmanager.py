"""RManager: one instance's rBlocks and the block tables of the requests it serves.

The scheduler talks to it only through request-level calls (`allocate_slots`, `free`). Blocks
come from the local pool; borrowing from other instances extends this class (cluster issue).
"""

from __future__ import annotations

from infinillm.kvcache import BlockPool, BlockTable, blocks_needed
from infinillm.types import BlockId, InstanceId, RequestId


class RManager:
    def __init__(self, instance_id: InstanceId, num_blocks: int, block_size: int) -> None:
        self.instance_id = instance_id
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tables: dict[RequestId, BlockTable] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def allocate_slots(self, request_id: RequestId, num_tokens: int) -> bool:
        """Grow the request's table to hold positions [0, num_tokens); False, nothing taken,
        when the blocks are not there."""
        table = self.tables.get(request_id)
        have = len(table) if table else 0
        need = blocks_needed(num_tokens, self.block_size) - have
        if need <= 0:
            return True
        blocks = self.pool.allocate(need, request_id)
        if blocks is None:
            return False
        if table is None:
            table = self.tables[request_id] = BlockTable()
        table.append(self.instance_id, blocks)
        return True

    def block_ids(self, request_id: RequestId) -> list[BlockId]:
        return self.tables[request_id].block_ids()

    def free(self, request_id: RequestId) -> None:
        table = self.tables.pop(request_id, None)
        if table is not None:
            self.pool.free(table.blocks_on(self.instance_id))

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        in_tables = [b for t in self.tables.values() for b in t.blocks_on(self.instance_id)]
        if len(in_tables) != len(set(in_tables)):
            raise RuntimeError(f"instance {self.instance_id}: a block is in two tables")
        if len(in_tables) != self.pool.num_used:
            raise RuntimeError(
                f"instance {self.instance_id}: tables hold {len(in_tables)} blocks, "
                f"pool has {self.pool.num_used} used"
            )
        for rid, table in self.tables.items():
            for b in table.blocks_on(self.instance_id):
                if self.pool.holder(b) != rid:
                    raise RuntimeError(f"block {b} is in {rid}'s table but held by "
                                       f"{self.pool.holder(b)}")
