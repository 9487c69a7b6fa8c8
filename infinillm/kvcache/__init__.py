"""KV cache: block ids (BlockPool, BlockTable) and the tensors that hold them (KVStorage)."""

from infinillm.kvcache.block_pool import BlockPool
from infinillm.kvcache.block_table import BlockTable, blocks_needed
from infinillm.kvcache.storage import KVStorage, block_bytes

__all__ = ["BlockPool", "BlockTable", "KVStorage", "block_bytes", "blocks_needed"]
