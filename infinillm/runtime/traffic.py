"""Where a step's tensors go: the row order of a step and the remote work it causes.

Both the worker that owns the requests and, for a multi-process fabric, the driver (to tell
each holder what it will receive) derive the same facts from a StepPlan with these functions:
the order of rows in the step's token batch, and per holder, which rows' K/V it must store at
which slots and which micro-attentions it must compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infinillm.types import BlockId, InstanceId, ScheduledChunk

# Decode requests with a context up to this many tokens share one padded kernel call; padding
# costs (longest - shortest) gathered keys per request, so long contexts go one by one.
MAX_PADDED_DECODE_LEN = 4096


@dataclass(slots=True)
class Prefix:
    """Positions before a chunk that one holder stores: the first `num_tokens` slots of
    `block_ids`."""

    block_ids: list[BlockId]
    num_tokens: int


@dataclass(slots=True)
class RemoteItem:
    """One request's micro-attention on a holder: query rows [row, row + num_rows) of the
    owner's batch over the holder's part of the request's prefix."""

    row: int
    num_rows: int
    prefix: Prefix


@dataclass(slots=True)
class RemoteWork:
    """Everything one owner asks of one holder in a step."""

    write_rows: list[int] = field(default_factory=list)
    write_slots: list[int] = field(default_factory=list)
    items: list[RemoteItem] = field(default_factory=list)
    # The index lists as tensors, by device, filled by the data plane (fabric.remote_index).
    tensors: dict[str, tuple] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_query_rows(self) -> int:
        return sum(i.num_rows for i in self.items)


def is_padded_decode(me: InstanceId, c: ScheduledChunk) -> bool:
    return (len(c.token_ids) == 1 and c.start_pos < MAX_PADDED_DECODE_LEN
            and all(holder == me for holder in c.holders))


def tokens_by_holder(c: ScheduledChunk, block_size: int) -> dict[InstanceId, int]:
    """How many of the positions < start_pos + len(token_ids) (the chunk's context, its own
    tokens included) each holder instance stores; holders that store none are left out.

    O(holders), from `c.holders`: every block of a table is full except the last one needed,
    which holds the remainder. A table longer than its context (blocks allocated for tokens not
    scheduled yet) costs one look per extra block."""
    end = c.start_pos + len(c.token_ids)
    num_used = -(-end // block_size)
    counts = {h: n * block_size for h, n in c.holders.items()}
    for holder, _ in c.blocks[num_used:]:  # blocks past the context: usually none
        counts[holder] -= block_size
    if num_used:
        counts[c.blocks[num_used - 1][0]] -= num_used * block_size - end
    return {h: n for h, n in counts.items() if n > 0}


def order_chunks(me: InstanceId, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], int]:
    """The step's row order (padded decodes first) and how many chunks are padded decodes.

    A padded call costs (number of decodes) x (longest context) gathered keys, so one long
    context among short ones would multiply the work of all of them: decodes join the padded
    call shortest first while the padding stays under the keys really read, and the longer rest
    go one by one (in place, over runs of blocks).
    """
    eligible = sorted((c for c in chunks if is_padded_decode(me, c)), key=lambda c: c.start_pos)
    keys = count = 0
    for c in eligible:
        if (count + 1) * (c.start_pos + 1) > 2 * (keys + c.start_pos + 1):
            break
        keys += c.start_pos + 1
        count += 1
    padded = {id(c) for c in eligible[:count]}
    if count == len(chunks):
        return chunks, count
    return ([c for c in chunks if id(c) in padded]
            + [c for c in chunks if id(c) not in padded], count)


def prefix_by_holder(c: ScheduledChunk, block_size: int) -> dict[InstanceId, Prefix]:
    """Split positions [0, start_pos) of a chunk's request by the instance that stores them."""
    num_full, tail = divmod(c.start_pos, block_size)
    by_holder: dict[InstanceId, Prefix] = {}
    for index in range(num_full + (tail > 0)):
        holder, block = c.blocks[index]
        p = by_holder.setdefault(holder, Prefix([], 0))
        p.block_ids.append(block)
        p.num_tokens += block_size if index < num_full else tail
    return by_holder


def remote_work(me: InstanceId, chunks: list[ScheduledChunk], num_padded: int,
                block_size: int) -> dict[InstanceId, RemoteWork]:
    """Per holder other than `me`, the writes and micro-attentions of `me`'s ordered chunks."""
    work: dict[InstanceId, RemoteWork] = {}
    row = 0
    for n, c in enumerate(chunks):
        for pos in range(c.start_pos, c.start_pos + len(c.token_ids)):
            holder, block = c.blocks[pos // block_size]
            if holder != me:
                w = work.setdefault(holder, RemoteWork())
                w.write_rows.append(row + pos - c.start_pos)
                w.write_slots.append(block * block_size + pos % block_size)
        if n >= num_padded:
            for holder, prefix in prefix_by_holder(c, block_size).items():
                if holder != me:
                    item = RemoteItem(row, len(c.token_ids), prefix)
                    work.setdefault(holder, RemoteWork()).items.append(item)
        row += len(c.token_ids)
    return work
