"""Fabric: the data plane between instances. Every tensor that crosses instances goes here.

Three exchanges, each batched per (owner, holder, layer) and step:
- `attend`: the owner ships queries; the holder runs micro-attention over the blocks it stores
  for each request and returns (out, lse) partials for the owner to merge;
- `write_kv`: K/V of new tokens whose positions fall in blocks held elsewhere;
- `move_blocks`: copy whole blocks between pools (recall and migration), all reads before any
  write, so a set of moves may swap blocks.

`InProcFabric` serves instances in one process (calls on the holder's storage); a
multi-process fabric implements the same interface over torch.distributed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from infinillm.attention import blocks_attention
from infinillm.kvcache import KVStorage
from infinillm.types import BlockId, InstanceId


@dataclass(slots=True)
class AttendItem:
    """One request's share of a remote micro-attention: its queries [Lq, Hq, D] and the first
    `num_tokens` slots of `block_ids`, the blocks the holder stores for it."""

    query: torch.Tensor
    block_ids: list[BlockId]
    num_tokens: int


@dataclass(slots=True)
class FabricStats:
    remote_attention_calls: int = 0
    remote_attention_items: int = 0
    remote_kv_writes: int = 0
    bytes_sent: int = 0
    blocks_moved: int = 0
    per_pair_calls: dict[tuple[InstanceId, InstanceId], int] = field(default_factory=dict)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Fabric(ABC):
    def __init__(self) -> None:
        self.stats = FabricStats()

    @abstractmethod
    def attend(self, owner: InstanceId, holder: InstanceId, layer: int, items: list[AttendItem],
               scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-attention on `holder` for each item: (out [Lq, Hq, D], lse [Hq, Lq] fp32)."""

    @abstractmethod
    def write_kv(self, owner: InstanceId, holder: InstanceId, layer: int, slots: torch.Tensor,
                 key: torch.Tensor, value: torch.Tensor) -> None:
        """Store K/V [T, Hkv, D] at flat `slots` [T] of `holder`'s cache."""

    @abstractmethod
    def move_blocks(self, moves: list[tuple[InstanceId, BlockId, InstanceId, BlockId]]) -> None:
        """Copy (src instance, src block) -> (dst instance, dst block), every layer."""

    def _count_attend(self, owner, holder, items, results) -> None:
        s = self.stats
        s.remote_attention_calls += 1
        s.remote_attention_items += len(items)
        s.per_pair_calls[owner, holder] = s.per_pair_calls.get((owner, holder), 0) + 1
        s.bytes_sent += sum(_nbytes(i.query) for i in items)
        s.bytes_sent += sum(_nbytes(o) + _nbytes(lse) for o, lse in results)


class InProcFabric(Fabric):
    """Instances in this process: a holder's work is a call on its KVStorage."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[InstanceId, KVStorage] = {}

    def register(self, instance: InstanceId, storage: KVStorage) -> None:
        self.storages[instance] = storage

    def attend(self, owner, holder, layer, items, scale):
        key_cache, value_cache = self.storages[holder].layer(layer)
        results = [blocks_attention(i.query, key_cache, value_cache, i.block_ids, i.num_tokens,
                                    scale=scale) for i in items]
        self._count_attend(owner, holder, items, results)
        return results

    def write_kv(self, owner, holder, layer, slots, key, value):
        self.storages[holder].write(layer, slots, key, value)
        self.stats.remote_kv_writes += 1
        self.stats.bytes_sent += _nbytes(key) + _nbytes(value) + _nbytes(slots)

    def move_blocks(self, moves):
        data = [self.storages[src].read_block(block) for src, block, _, _ in moves]
        for (_, _, dst, block), (k, v) in zip(moves, data):
            self.storages[dst].write_block(block, k, v)
        self.stats.blocks_moved += len(moves)
        self.stats.bytes_sent += sum(_nbytes(k) + _nbytes(v) for k, v in data)
