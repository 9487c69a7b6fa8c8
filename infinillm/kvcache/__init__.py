"""KV cache: block ids (BlockPool, BlockTable), prefix keys (block_keys), and the tensors that
hold them (KVStorage)."""

from infinillm.kvcache.block_pool import BlockPool
from infinillm.kvcache.block_table import BlockTable, blocks_needed
from infinillm.kvcache.prefix import BlockKey, block_keys
from infinillm.kvcache.storage import KVStorage, block_bytes

__all__ = ["BlockKey", "BlockPool", "BlockTable", "KVStorage", "block_bytes", "block_keys",
           "blocks_needed"]
