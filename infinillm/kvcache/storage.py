"""KVStorage: the only owner of KV tensors on an instance.

Per layer, keys and values are [Hkv, num_blocks, block_size, D] (head-major: a run of
consecutive blocks is one strided view per head, see attention/blocks.py). Tensors are zeroed at
start so that padded reads never meet NaN garbage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (key_cache, value_cache, slots, key, value) -> None; AttentionBackend.write_kv's signature
KVWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype) -> int:
    """Bytes one rBlock takes across all layers, keys and values."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * block_size * head_dim * itemsize


class KVStorage:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: str = "cpu",
                 writer: KVWriter | None = None) -> None:
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.device = self.keys.device
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.writer = writer  # a backend's write kernel (its write_kv), else the torch path

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """Store K/V of new tokens. slots [T] int64 flat slots; key/value [T, Hkv, D]."""
        if self.writer is not None:
            self.writer(self.keys[layer], self.values[layer], slots, key, value)
            return
        k_flat = self.keys[layer].view(self.keys.shape[1], -1, self.keys.shape[-1])
        v_flat = self.values[layer].view(self.values.shape[1], -1, self.values.shape[-1])
        k_flat[:, slots] = key.transpose(0, 1)
        v_flat[:, slots] = value.transpose(0, 1)

    def read_block(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of one block's K and V, every layer: two [L, Hkv, block_size, D] tensors."""
        return self.keys[:, :, block].clone(), self.values[:, :, block].clone()

    def write_block(self, block: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.keys[:, :, block] = key
        self.values[:, :, block] = value
