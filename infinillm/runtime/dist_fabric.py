"""DistFabric: the fabric among instance processes, over torch.distributed point-to-point.

Each instance process holds one DistFabric. Per layer, `exchange` runs two rounds of
`batch_isend_irecv`, each between only the pairs of instances that have traffic this step:

    1. owner -> holder: one flat tensor with the K/V rows to store there and the queries of
       every request that has blocks there;
    2. holder -> owner: the partial outputs (model dtype) and their lse (float32).

Message sizes follow from the step's plans: the owner derives its outgoing work itself, and the
driver hands every holder its incoming work in `begin_step`, so no sizes are exchanged. Block
moves use the same channels. The backend follows the KV storage's device: gloo for CPU tensors,
NCCL for CUDA tensors (one GPU per process); every buffer sent or received lives on that device.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from infinillm.attention import AttentionBackend
from infinillm.kvcache import KVStorage
from infinillm.runtime.fabric import Fabric, Partial, nbytes, remote_index, serve
from infinillm.runtime.traffic import RemoteWork
from infinillm.types import BlockMove, InstanceId


def dist_backend(device: torch.device | str) -> str:
    """The torch.distributed backend for tensors on `device`: "nccl" for CUDA, else "gloo"."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class DistFabric(Fabric):
    def __init__(self, me: InstanceId, storage: KVStorage, attention: AttentionBackend,
                 num_heads: int) -> None:
        super().__init__()
        self.me = me
        self.storage = storage
        self.attention = attention
        self.num_heads = num_heads
        self.kv_heads = storage.keys.shape[1]
        self.head_dim = storage.keys.shape[-1]
        self.dtype = storage.keys.dtype
        self.device = storage.device
        self.ranks: dict[InstanceId, int] = {}
        self.incoming: dict[InstanceId, RemoteWork] = {}

    # ---- group ----------------------------------------------------------------------------

    def connect(self, init_method: str, ranks: dict[InstanceId, int], timeout_s: float) -> None:
        """Join (or rejoin, after a peer was lost) the process group of `ranks`."""
        if dist.is_initialized():
            dist.destroy_process_group()
        self.ranks = dict(ranks)
        backend = dist_backend(self.device)
        options = {}
        if backend == "nccl":
            torch.cuda.set_device(self.device)  # NCCL's point-to-point calls need it
            options["device_id"] = self.device  # the communicator is made now, not lazily
        dist.init_process_group(backend, init_method=init_method, rank=ranks[self.me],
                                world_size=len(ranks), timeout=timedelta(seconds=timeout_s),
                                **options)
        if backend == "nccl":
            # Every rank joins one collective before any batch_isend_irecv, which NCCL
            # requires of the first call on a group.
            dist.all_reduce(torch.zeros(1, device=self.device))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- steps ----------------------------------------------------------------------------

    def begin_step(self, me: InstanceId, incoming: dict[InstanceId, RemoteWork]) -> None:
        self.incoming = incoming

    def active(self, me: InstanceId) -> bool:
        return bool(self.incoming)

    def _run(self, sends: list[tuple[torch.Tensor, InstanceId]],
             recvs: list[tuple[torch.Tensor, InstanceId]]) -> None:
        ops = [dist.P2POp(dist.isend, t, self.ranks[peer]) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, self.ranks[peer]) for t, peer in recvs]
        if ops:
            started = time.perf_counter()
            for request in dist.batch_isend_irecv(ops):
                request.wait()
            self.stats.transfer_seconds += time.perf_counter() - started

    def exchange(self, me, layer, outgoing, q, k, v, scale):
        started = time.perf_counter()
        try:
            return self._exchange(me, layer, outgoing, q, k, v, scale)
        finally:
            self.stats.exchange_seconds += time.perf_counter() - started

    def _exchange(self, me, layer, outgoing, q, k, v, scale):
        hkv, hq, d = self.kv_heads, self.num_heads, self.head_dim
        if self.fault is not None:
            self.fault("exchange.before", me)
        # round 1: K/V rows and queries to holders; the same from owners that use our blocks
        sends = []
        for holder, work in outgoing.items():
            rows = remote_index(work, self.device)[0]
            parts = [k[rows].reshape(-1), v[rows].reshape(-1)]
            parts += [q[i.row : i.row + i.num_rows].reshape(-1) for i in work.items]
            payload = torch.cat(parts)
            sends.append((payload, holder))
            self.stats.count(me, holder, work, nbytes(payload))
        recvs = [(torch.empty((2 * len(w.write_rows) * hkv + w.num_query_rows * hq) * d,
                              dtype=self.dtype, device=self.device), owner)
                 for owner, w in self.incoming.items()]
        self._run(sends, recvs)
        # serve the owners, then round 2: partials back; ours from the holders
        replies = []
        for buf, owner in recvs:
            work = self.incoming[owner]
            partials = serve(self.storage, self.attention, layer, work,
                             *self._unpack_request(buf, work), scale)
            if partials:
                outs = torch.cat([o.reshape(-1) for o, _ in partials]).to(self.dtype)
                lses = torch.cat([lse.reshape(-1) for _, lse in partials]).float()
                replies += [(outs, owner), (lses, owner)]
                self.stats.bytes_sent += nbytes(outs, lses)
        if self.fault is not None:
            self.fault("exchange.during", me)
        waiting = {}
        for holder, work in outgoing.items():
            if work.items:
                n = work.num_query_rows
                waiting[holder] = (torch.empty(n * hq * d, dtype=self.dtype, device=self.device),
                                   torch.empty(n * hq, dtype=torch.float32, device=self.device))
        recv2 = [(t, h) for h, pair in waiting.items() for t in pair]
        self._run(replies, recv2)
        return {h: self._unpack_reply(outs, lses, outgoing[h]) for h, (outs, lses) in
                waiting.items()}

    def _unpack_request(self, buf: torch.Tensor, work: RemoteWork):
        hkv, hq, d = self.kv_heads, self.num_heads, self.head_dim
        n = len(work.write_rows) * hkv * d
        k = buf[:n].view(-1, hkv, d)
        v = buf[n : 2 * n].view(-1, hkv, d)
        queries, offset = [], 2 * n
        for item in work.items:
            size = item.num_rows * hq * d
            queries.append(buf[offset : offset + size].view(item.num_rows, hq, d))
            offset += size
        return k, v, queries

    def _unpack_reply(self, outs: torch.Tensor, lses: torch.Tensor,
                      work: RemoteWork) -> list[Partial]:
        hq, d = self.num_heads, self.head_dim
        result, o_off, l_off = [], 0, 0
        for item in work.items:
            n = item.num_rows
            result.append((outs[o_off : o_off + n * hq * d].view(n, hq, d),
                           lses[l_off : l_off + hq * n].view(hq, n)))
            o_off += n * hq * d
            l_off += hq * n
        return result

    # ---- block moves ----------------------------------------------------------------------

    def move_blocks(self, moves: list[BlockMove]) -> None:
        """Run this instance's part of a set of moves; every instance named in `moves` calls
        this with the same list."""
        me = self.me
        outgoing: dict[InstanceId, list[torch.Tensor]] = {}
        local = []
        for move in moves:
            (src, block), (dst, dst_block) = move.src, move.dst
            if src != me:
                continue
            k, v = self.storage.read_block(block)
            if dst == me:
                local.append((dst_block, k, v))
            else:
                outgoing.setdefault(dst, []).extend([k.reshape(-1), v.reshape(-1)])
        block_numel = self.storage.keys[:, :, 0].numel()
        incoming: dict[InstanceId, list[int]] = {}
        for move in moves:
            (src, _), (dst, dst_block) = move.src, move.dst
            if dst == me and src != me:
                incoming.setdefault(src, []).append(dst_block)
        sends = [(torch.cat(parts), dst) for dst, parts in outgoing.items()]
        recvs = [(torch.empty(2 * len(blocks) * block_numel, dtype=self.dtype,
                              device=self.device), src) for src, blocks in incoming.items()]
        if self.fault is not None:
            self.fault("move", me)
        self._run(sends, recvs)
        shape = self.storage.keys[:, :, 0].shape
        for (buf, src) in recvs:
            for i, dst_block in enumerate(incoming[src]):
                k = buf[2 * i * block_numel : (2 * i + 1) * block_numel].view(shape)
                v = buf[(2 * i + 1) * block_numel : (2 * i + 2) * block_numel].view(shape)
                local.append((dst_block, k, v))
        for dst_block, k, v in local:
            self.storage.write_block(dst_block, k, v)
        self.stats.blocks_moved += sum(1 for m in moves if m.src[0] == me)
        self.stats.bytes_sent += sum(nbytes(t) for t, _ in sends)
