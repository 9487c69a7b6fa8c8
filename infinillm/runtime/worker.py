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

Instances in one process share the model: `forward_together` runs the rows of several workers'
steps (each from `Worker.rows`) as one forward, so every linear layer and the LM head multiply all
of them at once, and hands each worker's `_StepAttention` its own rows at every layer; each
worker then samples from its own logits (`Worker.finish`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from infinillm.attention import AttentionBackend
from infinillm.kvcache import KVStorage
from infinillm.model import LlamaModel
from infinillm.runtime.fabric import Fabric, Partial, index_tensors, remote_index
from infinillm.runtime.sampler import sample, token_logprobs
from infinillm.runtime.traffic import Prefix, order_chunks, prefix_by_holder, remote_work
from infinillm.types import InstanceId, ScheduledChunk, StepPlan, StepResult


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
        device = storage.device
        self.local_rows, self.local_slots = index_tensors(device, local_rows, local_slots)
        self.num_padded = num_padded
        if num_padded:
            self.slot_table, self.mask = (t.to(device, non_blocking=True) for t in
                                          self._padded_tables(chunks[:num_padded], bs))
        for work in self.remote.values():  # made here once, not at the first layer
            remote_index(work, device)
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
        """slot_table [B, Lmax] int64 and mask [B, 1, 1, Lmax] of the padded decodes, built
        from one [B, blocks] table in a few whole-batch operations (not a few per request).
        Padding points at a valid slot: of the request's own blocks, or of block 0."""
        lens = [c.start_pos + 1 for c in chunks]
        width = max(lens)
        num_blocks = -(-width // bs)
        table = [[b for _, b in c.blocks[:num_blocks]] for c in chunks]
        for row in table:
            row.extend([0] * (num_blocks - len(row)))
        block_table = torch.tensor(table, dtype=torch.int64)
        positions = torch.arange(width)
        slots = block_table[:, positions // bs] * bs + positions % bs
        padding = positions[None, :] >= torch.tensor(lens)[:, None]
        mask = torch.zeros(len(chunks), 1, 1, width).masked_fill_(padding[:, None, None, :],
                                                                   float("-inf"))
        return slots, mask

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


@dataclass(slots=True)
class StepRows:
    """One instance's share of a step's token batch: its rows (flat token ids and positions,
    in `order_chunks` order), its attention for them, and which rows its logits come from:
    `head_rows` lists the row of every sampling chunk, then every prompt-logprob row."""

    chunks: list[ScheduledChunk]
    attention: _StepAttention
    token_ids: list[int]
    positions: list[int]
    sampled: list[ScheduledChunk]
    head_rows: list[int]


class Worker:
    """Runs one instance: `execute(plan)` returns the sampled token of every sampling chunk,
    and the logprobs its chunks asked for.

    `execute` is `rows` -> the model's forward -> `finish`; the in-process executor calls the
    parts itself to run the rows of all its instances in one forward (`forward_together`)."""

    def __init__(self, instance_id: InstanceId, model: LlamaModel, storage: KVStorage,
                 attention: AttentionBackend, fabric: Fabric | None = None,
                 eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.instance_id = instance_id
        self.model = model
        self.storage = storage
        self.attention = attention  # this instance's kernels; its fabric serves holders with it
        self.fabric = fabric
        self.eos_token_ids = eos_token_ids  # banned by min_tokens

    def execute(self, plan: StepPlan) -> StepResult:
        if not plan.chunks:
            if self.fabric is not None and self.fabric.active(self.instance_id):
                self._serve_only()
            return StepResult({}, {})
        rows = self.rows(plan)
        # The forward pass needs at least one row; then its logits are unused.
        input_ids, input_positions, head_rows = index_tensors(
            self.storage.device, rows.token_ids, rows.positions, rows.head_rows or [0])
        logits = self.model.forward(input_ids, input_positions, rows.attention, head_rows)
        return self.finish(rows, logits)

    def rows(self, plan: StepPlan) -> StepRows:
        """The flat token batch of a plan with chunks, and its attention."""
        chunks, num_padded = order_chunks(self.instance_id, plan.chunks)
        attn = _StepAttention(self.instance_id, self.storage, self.attention, self.fabric,
                              chunks, num_padded, self.model.scale)
        token_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sampled: list[ScheduledChunk] = []
        prompt_rows: list[int] = []  # rows whose logits give prompt logprobs (rare)
        for c in chunks:
            if c.prompt_logprob_ids:
                first = len(token_ids) + c.prompt_logprob_pos - c.start_pos
                prompt_rows.extend(range(first, first + len(c.prompt_logprob_ids)))
            token_ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.start_pos + len(c.token_ids)))
            if c.sample:
                sample_rows.append(len(token_ids) - 1)
                sampled.append(c)
        return StepRows(chunks, attn, token_ids, positions, sampled, sample_rows + prompt_rows)

    def finish(self, rows: StepRows, logits: torch.Tensor) -> StepResult:
        """Sample and gather logprobs from logits [len(rows.head_rows), V] float32 (extra
        rows past those are ignored)."""
        result = StepResult({}, {})
        num_sampled = len(rows.sampled)
        if len(rows.head_rows) > num_sampled:
            self._prompt_logprobs(logits[num_sampled : len(rows.head_rows)], rows.chunks,
                                  result)
        if num_sampled:
            self._sample(logits[:num_sampled], rows.sampled, result)
        return result

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledChunk],
                result: StepResult) -> None:
        """logits [S, V] float32, one row per sampling chunk."""
        tokens = sample(logits, [c.params for c in sampled],
                        [c.num_output_tokens for c in sampled],
                        [c.prompt_token_ids for c in sampled],
                        [c.output_token_ids for c in sampled], self.eos_token_ids,
                        [c.token_bitmask for c in sampled])
        result.sampled = {c.request_id: t for c, t in zip(sampled, tokens)}
        rows = [i for i, c in enumerate(sampled) if c.params.logprobs is not None]
        if rows:
            found = token_logprobs(logits[rows], [tokens[i] for i in rows],
                                   [sampled[i].params.logprobs for i in rows])
            result.logprobs = {sampled[i].request_id: lp for i, lp in zip(rows, found)}

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, chunks: list[ScheduledChunk],
                         result: StepResult) -> None:
        """logits [P, V] float32: the rows of every chunk's `prompt_logprob_ids`, in order."""
        asking = [c for c in chunks if c.prompt_logprob_ids]
        targets = [t for c in asking for t in c.prompt_logprob_ids]
        num_top = [c.params.prompt_logprobs for c in asking for _ in c.prompt_logprob_ids]
        found = token_logprobs(logits, targets, num_top)
        row = 0
        for c in asking:
            n = len(c.prompt_logprob_ids)
            result.prompt_logprobs[c.request_id] = found[row : row + n]
            row += n

    def _serve_only(self) -> None:
        """A holder with no tokens of its own still answers every layer's exchange."""
        empty = torch.empty(0, 0, 0)
        for layer in range(len(self.model.layers)):
            self.fabric.exchange(self.instance_id, layer, {}, empty, empty, empty,
                                 self.model.scale)


class _JointAttention:
    """The AttentionFn of one forward over several instances' rows: per layer, each
    instance's `_StepAttention` on its own rows [start, end) of q/k/v, outputs concatenated.
    `seconds[i]` sums the time spent in part i's attention (its fabric exchange included).

    Instances take their turns layer by layer (all of layer l, then all of layer l + 1) rather
    than one instance's whole forward after another's. Attention reads nothing another
    instance writes in the same step: a request's blocks (local or borrowed) belong to that
    request alone, so an owner's exchange writes K/V only into blocks of its own requests and
    reads only those; and every layer has its own K/V tensors. So the order of the turns within
    a layer changes no result, and each owner's writes of layer l still precede its reads of
    layer l (they happen inside its own call, before its attention)."""

    def __init__(self, parts: list[_StepAttention], bounds: list[int]) -> None:
        self.parts = parts
        self.bounds = bounds  # len(parts) + 1 row offsets
        self.seconds = [0.0] * len(parts)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, part in enumerate(self.parts):
            started = time.perf_counter()
            rows = slice(self.bounds[i], self.bounds[i + 1])
            outs.append(part(layer, q[rows], k[rows], v[rows]))
            self.seconds[i] += time.perf_counter() - started
        return torch.cat(outs)


def forward_together(model: LlamaModel,
                     steps: list[StepRows]) -> tuple[list[torch.Tensor], list[float]]:
    """One forward of the shared model over the rows of several instances (in-process
    instances share one copy of the weights): every linear layer and the LM head run once for
    all of them, attention per instance. Returns each step's logits [len(head_rows), V]
    float32, and the seconds each step spent in its own attention."""
    token_ids: list[int] = []
    positions: list[int] = []
    head_rows: list[int] = []
    bounds = [0]
    for s in steps:
        head_rows.extend(len(token_ids) + r for r in s.head_rows)
        token_ids.extend(s.token_ids)
        positions.extend(s.positions)
        bounds.append(len(token_ids))
    attn = _JointAttention([s.attention for s in steps], bounds)
    # The forward pass needs at least one row; then its logits are unused.
    input_ids, input_positions, rows = index_tensors(model.device, token_ids, positions,
                                                     head_rows or [0])
    logits = model.forward(input_ids, input_positions, attn, rows)
    if not head_rows:
        return [logits[:0]] * len(steps), attn.seconds
    return list(logits.split([len(s.head_rows) for s in steps])), attn.seconds
