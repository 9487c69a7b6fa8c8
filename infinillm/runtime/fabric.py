"""Fabric: the data plane between instances. Every tensor that crosses instances goes here.

Per attention layer and step, one `exchange` per instance carries all of its remote traffic:
as an owner, the K/V rows it must store on each holder and the queries of its requests that
have blocks there; as a holder, it stores what others send and computes the micro-attention
they ask for, returning (out, lse) partials that the owner merges. `move_blocks` copies whole
blocks between pools (recall and migration), all reads before any write, so a set of moves may
swap blocks.

`InProcFabric` serves instances in one process (the owner's call works on the holder's storage
directly). `DistFabric` (dist_fabric.py) does the same among processes over torch.distributed.
Either way a holder computes with its own worker's AttentionBackend.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from infinillm.attention import AttentionBackend, Partial
from infinillm.kvcache import KVStorage
from infinillm.runtime.faults import Fault
from infinillm.runtime.traffic import RemoteWork
from infinillm.types import BlockMove, InstanceId


@dataclass(slots=True)
class FabricStats:
    remote_attention_calls: int = 0  # one per (owner, holder, layer) exchange with queries
    remote_attention_items: int = 0  # requests served in those calls
    remote_kv_writes: int = 0
    bytes_sent: int = 0
    blocks_moved: int = 0
    exchange_seconds: float = 0.0  # wall time inside `exchange`, holder work included
    transfer_seconds: float = 0.0  # of which: waiting for peers and moving bytes
    execute_seconds: float = 0.0  # wall time of the worker's steps (set by the executor)
    per_pair_calls: dict[tuple[InstanceId, InstanceId], int] = field(default_factory=dict)

    def count(self, owner: InstanceId, holder: InstanceId, work: RemoteWork,
              sent: int) -> None:
        if work.items:
            self.remote_attention_calls += 1
            self.remote_attention_items += len(work.items)
            key = (owner, holder)
            self.per_pair_calls[key] = self.per_pair_calls.get(key, 0) + 1
        self.remote_kv_writes += bool(work.write_rows)
        self.bytes_sent += sent


def index_tensors(device: torch.device, *index_lists: list[int]) -> list[torch.Tensor]:
    """Each list as an int64 tensor on `device`: built on the host, moved in one copy (a step
    makes these once, outside the layer loop, which then never waits for the host)."""
    flat = torch.tensor([i for ids in index_lists for i in ids], dtype=torch.int64)
    if flat.device != device:
        flat = flat.to(device, non_blocking=True)
    return list(flat.split([len(ids) for ids in index_lists]))


def remote_index(work: RemoteWork, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`work.write_rows` and `write_slots` as int64 tensors on `device`, made once per step
    and kept on the work (every layer asks)."""
    key = str(device)
    found = work.tensors.get(key)
    if found is None:
        found = work.tensors[key] = tuple(index_tensors(device, work.write_rows,
                                                        work.write_slots))
    return found


def serve(storage: KVStorage, attention: AttentionBackend, layer: int, work: RemoteWork,
          k: torch.Tensor, v: torch.Tensor, queries: list[torch.Tensor],
          scale: float) -> list[Partial]:
    """The holder's side of one owner's work: store K/V rows, compute each micro-attention
    with the holder's backend.

    k, v [len(work.write_rows), Hkv, D]; queries[i] [work.items[i].num_rows, Hq, D]; each
    partial is (out [num_rows, Hq, D], lse [Hq, num_rows] float32)."""
    if work.write_rows:
        storage.write(layer, remote_index(work, storage.device)[1], k, v)
    key_cache, value_cache = storage.layer(layer)
    return [attention.blocks_attention(q, key_cache, value_cache, i.prefix.block_ids,
                                       i.prefix.num_tokens, scale=scale)
            for q, i in zip(queries, work.items)]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Fabric(ABC):
    def __init__(self) -> None:
        self.stats = FabricStats()
        self.fault: Fault | None = None  # tests only (faults.py)

    def begin_step(  # noqa: B027 (optional hook)
        self, me: InstanceId, incoming: dict[InstanceId, RemoteWork]
    ) -> None:
        """Before a step: what other owners will ask of `me` (needed by multi-process fabrics
        to size their receives; the in-process fabric ignores it)."""

    def active(self, me: InstanceId) -> bool:
        """Whether `me` must call `exchange` at every layer of this step as a holder."""
        return False

    @abstractmethod
    def exchange(self, me: InstanceId, layer: int, outgoing: dict[InstanceId, RemoteWork],
                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> dict[InstanceId, list[Partial]]:
        """Do `me`'s remote traffic of one layer; returns, per holder, the partials of its
        items. q [T, Hq, D], k/v [T, Hkv, D] are `me`'s whole step batch (rows as in work)."""

    @abstractmethod
    def move_blocks(self, moves: list[BlockMove]) -> None:
        """Copy every move's `src` block to its `dst` block, every layer."""


class InProcFabric(Fabric):
    """Instances in this process: a holder's work is a call on its KVStorage and backend."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[InstanceId, KVStorage] = {}
        self.backends: dict[InstanceId, AttentionBackend] = {}

    def register(self, instance: InstanceId, storage: KVStorage,
                 attention: AttentionBackend) -> None:
        self.storages[instance] = storage
        self.backends[instance] = attention

    def unregister(self, instance: InstanceId) -> None:
        """Forget a lost instance: nothing reaches its storage any more."""
        self.storages.pop(instance, None)
        self.backends.pop(instance, None)

    def exchange(self, me, layer, outgoing, q, k, v, scale):
        started = time.perf_counter()
        if self.fault is not None:
            for instance in (me, *outgoing):
                self.fault("exchange.before", instance)
        results = {}
        for holder, work in outgoing.items():
            rows = remote_index(work, k.device)[0]
            queries = [q[i.row : i.row + i.num_rows] for i in work.items]
            results[holder] = serve(self.storages[holder], self.backends[holder], layer, work,
                                    k[rows], v[rows], queries, scale)
            sent = nbytes(k[rows], v[rows], *queries)
            sent += sum(nbytes(o, lse) for o, lse in results[holder])
            self.stats.count(me, holder, work, sent)
        if self.fault is not None:
            for instance in (me, *outgoing):
                self.fault("exchange.during", instance)
        self.stats.exchange_seconds += time.perf_counter() - started
        return results

    def move_blocks(self, moves):
        data = [self.storages[m.src[0]].read_block(m.src[1]) for m in moves]
        for m, (k, v) in zip(moves, data):
            if self.fault is not None:
                self.fault("move", m.src[0])
                self.fault("move", m.dst[0])
            self.storages[m.dst[0]].write_block(m.dst[1], k, v)
        self.stats.blocks_moved += len(moves)
        self.stats.bytes_sent += sum(nbytes(k, v) for k, v in data)
