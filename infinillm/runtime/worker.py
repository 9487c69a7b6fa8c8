"""Worker: one instance's model, KV storage and sampler; executes a StepPlan.

The worker is where block tables become tensors. For each step it flattens the scheduled
chunks into one token batch, computes where each new token's K/V goes (a local slot, or a slot
of a block borrowed from another instance), and supplies the model with an attention function
that runs DistAttention per layer:

- write the step's K/V: local slots directly, borrowed ones through the fabric, one batched
  write per holder;
- decode tokens of requests whose blocks are all local, with short contexts, share one padded
  kernel call;
- every other request gets partials, merged exactly: its chunk attending causally to itself
  (from the fresh K/V, no cache read), its earlier positions stored here (read in place where
  blocks are adjacent), and those stored on each holder, computed there by one batched
  `Fabric.attend` call per holder and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinillm.attention import (
    blocks_attention,
    merge,
    micro_attention,
    padded_decode_attention,
)
from infinillm.kvcache import KVStorage
from infinillm.model import LlamaModel
from infinillm.runtime.fabric import AttendItem, Fabric
from infinillm.runtime.sampler import sample
from infinillm.types import BlockId, InstanceId, RequestId, ScheduledChunk, StepPlan

# Decode requests with a context up to this many tokens share one padded kernel call; padding
# costs (longest - shortest) gathered keys per request, so long contexts go one by one.
MAX_PADDED_DECODE_LEN = 4096


@dataclass(slots=True)
class _Prefix:
    """The positions before a chunk that one holder stores: first `num_tokens` of `block_ids`."""

    block_ids: list[BlockId]
    num_tokens: int


@dataclass(slots=True)
class _Single:
    row: int
    num_tokens: int
    local: _Prefix | None
    remote: dict[InstanceId, _Prefix]


def _prefix_by_holder(c: ScheduledChunk, block_size: int) -> dict[InstanceId, _Prefix]:
    """Split positions [0, start_pos) of a chunk's request by the instance that stores them."""
    num_full, tail = divmod(c.start_pos, block_size)
    by_holder: dict[InstanceId, _Prefix] = {}
    for index in range(num_full + (tail > 0)):
        holder, block = c.blocks[index]
        p = by_holder.setdefault(holder, _Prefix([], 0))
        p.block_ids.append(block)
        p.num_tokens += block_size if index < num_full else tail
    return by_holder


class _StepAttention:
    """The AttentionFn of one step."""

    def __init__(self, me: InstanceId, storage: KVStorage, fabric: Fabric | None,
                 chunks: list[ScheduledChunk], num_padded: int, scale: float) -> None:
        self.me, self.storage, self.fabric, self.scale = me, storage, fabric, scale
        bs = storage.block_size
        local_rows: list[int] = []
        local_slots: list[int] = []
        remote: dict[InstanceId, tuple[list[int], list[int]]] = {}
        row = 0
        for c in chunks:
            for pos in range(c.start_pos, c.start_pos + len(c.token_ids)):
                holder, block = c.blocks[pos // bs]
                rows, slots = (local_rows, local_slots) if holder == me else \
                    remote.setdefault(holder, ([], []))
                rows.append(row)
                slots.append(block * bs + pos % bs)
                row += 1
        self.all_local = not remote
        self.local_rows = torch.tensor(local_rows, dtype=torch.int64)
        self.local_slots = torch.tensor(local_slots, dtype=torch.int64)
        self.remote_writes = {h: (torch.tensor(r), torch.tensor(s)) for h, (r, s) in remote.items()}
        self.num_padded = num_padded
        if num_padded:
            self.slot_table, self.mask = self._padded_tables(chunks[:num_padded], bs)
        self.single: list[_Single] = []
        row = num_padded
        for c in chunks[num_padded:]:
            prefix = _prefix_by_holder(c, bs)
            local = prefix.pop(me, None)
            self.single.append(_Single(row, len(c.token_ids), local, prefix))
            row += len(c.token_ids)

    @staticmethod
    def _padded_tables(chunks: list[ScheduledChunk], bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        lens = [c.start_pos + 1 for c in chunks]
        width = max(lens)
        positions = torch.arange(width)
        tables = torch.zeros(len(chunks), width, dtype=torch.int64)
        for i, c in enumerate(chunks):
            ids = torch.tensor([b for _, b in c.blocks], dtype=torch.int64)
            n = lens[i]
            tables[i, :n] = ids[positions[:n] // bs] * bs + positions[:n] % bs
        mask = torch.zeros(len(chunks), 1, 1, width)
        mask.masked_fill_(positions[None, None, None, :] >= torch.tensor(lens)[:, None, None, None],
                          float("-inf"))
        return tables, mask

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.all_local:
            self.storage.write(layer, self.local_slots, k, v)
            return
        if len(self.local_rows):
            self.storage.write(layer, self.local_slots, k[self.local_rows], v[self.local_rows])
        for holder, (rows, slots) in self.remote_writes.items():
            self.fabric.write_kv(self.me, holder, layer, slots, k[rows], v[rows])

    def _remote(self, layer: int, q: torch.Tensor) -> dict[tuple[int, InstanceId], tuple]:
        """One batched micro-attention call per holder; results keyed by (request row, holder)."""
        per_holder: dict[InstanceId, list[tuple[int, AttendItem]]] = {}
        for s in self.single:
            for holder, p in s.remote.items():
                item = AttendItem(q[s.row : s.row + s.num_tokens], p.block_ids, p.num_tokens)
                per_holder.setdefault(holder, []).append((s.row, item))
        results = {}
        for holder, entries in per_holder.items():
            outs = self.fabric.attend(self.me, holder, layer, [e[1] for e in entries], self.scale)
            for (row, _), out in zip(entries, outs):
                results[row, holder] = out
        return results

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        self._write(layer, k, v)
        key_cache, value_cache = self.storage.layer(layer)
        parts = []
        if self.num_padded:
            out, _ = padded_decode_attention(q[: self.num_padded], key_cache, value_cache,
                                             self.slot_table, self.mask, scale=self.scale)
            parts.append(out)
        remote = self._remote(layer, q) if not self.all_local else {}
        for s in self.single:
            rows = slice(s.row, s.row + s.num_tokens)
            partials = [micro_attention(q[rows], k[rows].transpose(0, 1), v[rows].transpose(0, 1),
                                        scale=self.scale, causal=True)]
            if s.local is not None:
                partials.append(blocks_attention(q[rows], key_cache, value_cache,
                                                 s.local.block_ids, s.local.num_tokens,
                                                 scale=self.scale))
            partials += [remote[s.row, holder] for holder in s.remote]
            parts.append(merge([p[0] for p in partials], [p[1] for p in partials])[0])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Worker:
    """Runs one instance: `execute(plan)` returns the sampled token of every sampling chunk."""

    def __init__(self, instance_id: InstanceId, model: LlamaModel, storage: KVStorage,
                 fabric: Fabric | None = None) -> None:
        self.instance_id = instance_id
        self.model = model
        self.storage = storage
        self.fabric = fabric

    def execute(self, plan: StepPlan) -> dict[RequestId, int]:
        if not plan.chunks:
            return {}
        chunks = self._order(plan.chunks)
        num_padded = sum(1 for c in chunks if self._padded(c))
        attn = _StepAttention(self.instance_id, self.storage, self.fabric, chunks, num_padded,
                              self.model.scale)
        token_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sampled: list[ScheduledChunk] = []
        for c in chunks:
            token_ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.start_pos + len(c.token_ids)))
            if c.sample:
                sample_rows.append(len(token_ids) - 1)
                sampled.append(c)
        if not sampled:
            sample_rows = [0]  # the forward pass needs at least one row; its logits are unused
        logits = self.model.forward(
            torch.tensor(token_ids, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
            attn,
            torch.tensor(sample_rows, dtype=torch.int64),
        )
        if not sampled:
            return {}
        tokens = sample(logits, [c.params for c in sampled], [c.num_output_tokens for c in sampled])
        return {c.request_id: t for c, t in zip(sampled, tokens)}

    def _padded(self, c: ScheduledChunk) -> bool:
        return (len(c.token_ids) == 1 and c.start_pos < MAX_PADDED_DECODE_LEN
                and all(holder == self.instance_id for holder, _ in c.blocks))

    def _order(self, chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
        padded = [c for c in chunks if self._padded(c)]
        if len(padded) == len(chunks):
            return chunks
        return padded + [c for c in chunks if not self._padded(c)]
