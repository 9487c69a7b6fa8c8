"""Worker: one instance's model, KV storage and sampler; executes a StepPlan.

The worker is where block tables become tensors. For each step it flattens the scheduled
chunks into one token batch (decode chunks first), builds the slot mapping that says where each
new token's K/V goes, and supplies the model with an attention function that writes K/V into
the instance's KVStorage and computes attention over each request's blocks:

- decode tokens of requests with short contexts share one padded kernel call per layer;
- prefill chunks and long-context decodes use paged attention, which reads runs of adjacent
  blocks in place and merges the partials exactly.
"""

from __future__ import annotations

import logging

import torch

from infinillm.attention import padded_decode_attention, paged_attention
from infinillm.kvcache import KVStorage
from infinillm.model import LlamaModel
from infinillm.runtime.sampler import sample
from infinillm.types import InstanceId, RequestId, ScheduledChunk, StepPlan

logger = logging.getLogger("infinillm")

# Decode requests with a context up to this many tokens share one padded kernel call; padding
# costs (longest - shortest) gathered keys per request, so long contexts go one by one.
MAX_PADDED_DECODE_LEN = 4096


class _StepAttention:
    """The AttentionFn of one step: writes new K/V, then attends over each request's blocks."""

    def __init__(self, storage: KVStorage, chunks: list[ScheduledChunk], num_padded: int,
                 scale: float) -> None:
        self.storage = storage
        self.scale = scale
        bs = storage.block_size
        slots: list[int] = []
        for c in chunks:
            for pos in range(c.start_pos, c.start_pos + len(c.token_ids)):
                slots.append(c.block_ids[pos // bs] * bs + pos % bs)
        self.slots = torch.tensor(slots, dtype=torch.int64)
        self.num_padded = num_padded
        self.slot_table = self.mask = None
        if num_padded:
            self.slot_table, self.mask = self._padded_tables(chunks[:num_padded], bs)
        # (first row, chunk) of the requests attended one by one
        self.single: list[tuple[int, ScheduledChunk]] = []
        row = num_padded
        for c in chunks[num_padded:]:
            self.single.append((row, c))
            row += len(c.token_ids)

    @staticmethod
    def _padded_tables(chunks: list[ScheduledChunk], bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        lens = [c.start_pos + 1 for c in chunks]
        width = max(lens)
        positions = torch.arange(width)
        tables = torch.zeros(len(chunks), width, dtype=torch.int64)
        for i, c in enumerate(chunks):
            ids = torch.tensor(c.block_ids, dtype=torch.int64)
            n = lens[i]
            tables[i, :n] = ids[positions[:n] // bs] * bs + positions[:n] % bs
        mask = torch.zeros(len(chunks), 1, 1, width)
        mask.masked_fill_(positions[None, None, None, :] >= torch.tensor(lens)[:, None, None, None],
                          float("-inf"))
        return tables, mask

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        self.storage.write(layer, self.slots, k, v)
        key_cache, value_cache = self.storage.layer(layer)
        parts = []
        if self.num_padded:
            out, _ = padded_decode_attention(q[: self.num_padded], key_cache, value_cache,
                                             self.slot_table, self.mask, scale=self.scale)
            parts.append(out)
        for row, c in self.single:
            out, _ = paged_attention(q[row : row + len(c.token_ids)], key_cache, value_cache,
                                     c.block_ids, start_pos=c.start_pos, scale=self.scale)
            parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Worker:
    """Runs one instance: `execute(plan)` returns the sampled token of every sampling chunk."""

    def __init__(self, instance_id: InstanceId, model: LlamaModel, storage: KVStorage) -> None:
        self.instance_id = instance_id
        self.model = model
        self.storage = storage

    def execute(self, plan: StepPlan) -> dict[RequestId, int]:
        if not plan.chunks:
            return {}
        chunks = self._order(plan.chunks)
        num_padded = sum(1 for c in chunks if self._padded(c))
        attn = _StepAttention(self.storage, chunks, num_padded, self.model.scale)
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

    @staticmethod
    def _padded(c: ScheduledChunk) -> bool:
        return len(c.token_ids) == 1 and c.start_pos < MAX_PADDED_DECODE_LEN

    def _order(self, chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
        padded = [c for c in chunks if self._padded(c)]
        if len(padded) == len(chunks):
            return chunks
        return padded + [c for c in chunks if not self._padded(c)]
