"""Worker: one instance's model, KV storage and sampler; executes a StepPlan.

The worker is where block tables become tensors. For each step it flattens the scheduled
chunks into one token batch (runtime/traffic.py fixes the row order), finds where each new
token's K/V goes (a local slot, or a slot of a block borrowed from another instance), and
supplies the model with an attention function that runs DistAttention per layer:

- write the step's K/V into local slots; the fabric's one exchange per layer carries the rows
  bound for other holders together with the queries those holders must attend with;
- decode tokens of requests whose blocks are all local, with short contexts, share one padded
  kernel call (`padded_decode_attention`);
- every other request gets partials, merged exactly (`chunk_attention`): its chunk attending
  causally to itself (from the fresh K/V, no cache read), its earlier positions stored here
  (read in place where blocks are adjacent), and those stored on each holder, computed there.

The kernels are the worker's own AttentionBackend, chosen when the worker is built.
"""

from __future__ import annotations

import torch

from infinillm.attention import AttentionBackend
from infinillm.kvcache import KVStorage
from infinillm.model import LlamaModel
from infinillm.runtime.fabric import Fabric, Partial
from infinillm.runtime.sampler import sample
from infinillm.runtime.traffic import Prefix, order_chunks, prefix_by_holder, remote_work
from infinillm.types import InstanceId, RequestId, ScheduledChunk, StepPlan


class _StepAttention:
    """The AttentionFn of one step."""

    def __init__(self, me: InstanceId, storage: KVStorage, attention: AttentionBackend,
                 fabric: Fabric | None, chunks: list[ScheduledChunk], num_padded: int,
                 scale: float) -> None:
        self.me, self.storage, self.fabric, self.scale = me, storage, fabric, scale
        self.attention = attention
        bs = storage.block_size
        self.remote = remote_work(me, chunks, num_padded, bs)
        self.exchanging = fabric is not None and (bool(self.remote) or fabric.active(me))
        local_rows, local_slots, row = [], [], 0
        for c in chunks:
            for pos in range(c.start_pos, c.start_pos + len(c.token_ids)):
                holder, block = c.blocks[pos // bs]
                if holder == me:
                    local_rows.append(row)
                    local_slots.append(block * bs + pos % bs)
                row += 1
        self.all_rows_local = len(local_rows) == row
        self.local_rows = torch.tensor(local_rows, dtype=torch.int64)
        self.local_slots = torch.tensor(local_slots, dtype=torch.int64)
        self.num_padded = num_padded
        if num_padded:
            self.slot_table, self.mask = self._padded_tables(chunks[:num_padded], bs)
        # per request: first row, rows, the local part of its prefix, holders of the rest
        self.single: list[tuple[int, int, Prefix | None, list[InstanceId]]] = []
        row = num_padded
        for c in chunks[num_padded:]:
            prefix = prefix_by_holder(c, bs)
            local = prefix.pop(me, None)
            self.single.append((row, len(c.token_ids), local, list(prefix)))
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

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        if self.all_rows_local:
            self.storage.write(layer, self.local_slots, k, v)
        elif len(self.local_rows):
            self.storage.write(layer, self.local_slots, k[self.local_rows], v[self.local_rows])
        remote: dict[tuple[int, InstanceId], Partial] = {}
        if self.exchanging:
            results = self.fabric.exchange(self.me, layer, self.remote, q, k, v, self.scale)
            for holder, partials in results.items():
                for item, partial in zip(self.remote[holder].items, partials):
                    remote[item.row, holder] = partial
        key_cache, value_cache = self.storage.layer(layer)
        attention, parts = self.attention, []
        if self.num_padded:
            out, _ = attention.padded_decode_attention(
                q[: self.num_padded], key_cache, value_cache, self.slot_table, self.mask,
                scale=self.scale)
            parts.append(out)
        for row, n, local, holders in self.single:
            rows = slice(row, row + n)
            block_ids, num_local = (local.block_ids, local.num_tokens) if local else ((), 0)
            out, _ = attention.chunk_attention(
                q[rows], k[rows].transpose(0, 1), v[rows].transpose(0, 1), key_cache,
                value_cache, block_ids, num_local, scale=self.scale,
                partials=[remote[row, holder] for holder in holders])
            parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Worker:
    """Runs one instance: `execute(plan)` returns the sampled token of every sampling chunk."""

    def __init__(self, instance_id: InstanceId, model: LlamaModel, storage: KVStorage,
                 attention: AttentionBackend, fabric: Fabric | None = None) -> None:
        self.instance_id = instance_id
        self.model = model
        self.storage = storage
        self.attention = attention  # this instance's kernels; its fabric serves holders with it
        self.fabric = fabric

    def execute(self, plan: StepPlan) -> dict[RequestId, int]:
        if not plan.chunks:
            if self.fabric is not None and self.fabric.active(self.instance_id):
                self._serve_only()
            return {}
        chunks, num_padded = order_chunks(self.instance_id, plan.chunks)
        attn = _StepAttention(self.instance_id, self.storage, self.attention, self.fabric,
                              chunks, num_padded, self.model.scale)
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

    def _serve_only(self) -> None:
        """A holder with no tokens of its own still answers every layer's exchange."""
        empty = torch.empty(0, 0, 0)
        for layer in range(len(self.model.layers)):
            self.fabric.exchange(self.instance_id, layer, {}, empty, empty, empty,
                                 self.model.scale)
