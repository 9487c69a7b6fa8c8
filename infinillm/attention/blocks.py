"""Reading a sequence's K/V out of a block-structured cache, in pieces a kernel can take.

Cache layout (one layer, one holder): key_cache and value_cache are [Hkv, num_blocks,
block_size, D]. Head-major storage makes a run of consecutive block ids one strided view
[Hkv, n * block_size, D], which the flash kernel reads in place; only fragmented tables pay for a
gather. Block `block_ids[i]` holds the sequence's positions [i * block_size, (i + 1) * block_size).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

# Fragmented prefixes: below this mean run length (tokens) one gather + one kernel call beats a
# kernel call per run (a call costs ~20 us; gathering a token of K and V moves 2 * Hkv * D values).
MIN_MEAN_RUN_TOKENS = 256
# Long in-place runs are cut into pieces of at most this many tokens: the CPU flash kernel runs a
# one-token query over ~1K keys faster per key than over 32K (bench/blocked_attention_overhead.py),
# and the merge of the pieces costs little.
MAX_PIECE_TOKENS = 1024


def slot_runs(block_ids: Sequence[int], block_size: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Maximal contiguous ranges of flat cache slots holding positions [lo, hi).

    Returns (first_slot, num_slots) pairs in position order; a flat slot is
    block_id * block_size + offset. Memoized: every layer of a step asks the same question.
    """
    return list(_slot_runs(tuple(block_ids), block_size, lo, hi))


@functools.lru_cache(maxsize=4096)
def _slot_runs(block_ids: tuple[int, ...], block_size: int, lo: int,
               hi: int) -> tuple[tuple[int, int], ...]:
    runs: list[tuple[int, int]] = []
    pos = lo
    while pos < hi:
        index, offset = divmod(pos, block_size)
        take = min(block_size - offset, hi - pos)
        slot = block_ids[index] * block_size + offset
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + take)
        else:
            runs.append((slot, take))
        pos += take
    return tuple(runs)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    hkv, num_blocks, block_size, d = cache.shape
    return cache.view(hkv, num_blocks * block_size, d)


def _view(cache_flat: torch.Tensor, run: tuple[int, int]) -> torch.Tensor:
    start, n = run
    return cache_flat[:, start : start + n]


def _gather_blocks(cache: torch.Tensor, block_ids: Sequence[int], lo: int, hi: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy positions [lo, hi) into one [Hkv, hi - lo, D] tensor, whole blocks at a time.

    `out`, if given, is a reusable buffer of at least the blocks' size."""
    bs = cache.shape[2]
    first, last = lo // bs, (hi - 1) // bs
    index = torch.tensor(block_ids[first : last + 1], dtype=torch.int64, device=cache.device)
    shape = (cache.shape[0], len(index), bs, cache.shape[3])
    if out is not None:
        out = out.view(-1)[: math.prod(shape)].view(shape)
    blocks = torch.index_select(cache, 1, index, out=out)  # [Hkv, n, bs, D], contiguous
    flat = blocks.view(cache.shape[0], -1, cache.shape[3])
    return flat[:, lo - first * bs : hi - first * bs]


def _pieces(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(s + i, min(MAX_PIECE_TOKENS, n - i)) for s, n in runs
            for i in range(0, n, MAX_PIECE_TOKENS)]


def key_value_pieces(key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_ids: Sequence[int], num_tokens: int):
    """K/V of positions [0, num_tokens) as an iterable of ([Hkv, n, D], [Hkv, n, D]) pieces.

    Long runs of adjacent blocks are read in place, cut into pieces of at most MAX_PIECE_TOKENS;
    a fragmented table is gathered piece by piece, so that each piece is still in cache when the
    kernel reads it. num_tokens > 0.
    """
    block_size = key_cache.shape[2]
    runs = slot_runs(block_ids, block_size, 0, num_tokens)
    if len(runs) == 1 and runs[0][1] <= MAX_PIECE_TOKENS:
        return [(_view(_flat(key_cache), runs[0]), _view(_flat(value_cache), runs[0]))]
    if num_tokens / len(runs) >= MIN_MEAN_RUN_TOKENS:
        k_flat, v_flat = _flat(key_cache), _flat(value_cache)
        return [(_view(k_flat, r), _view(v_flat, r)) for r in _pieces(runs)]
    return _gathered_pieces(key_cache, value_cache, block_ids, 0, num_tokens)


def _gathered_pieces(key_cache, value_cache, block_ids, lo, hi):
    """Yield gathered pieces one at a time, reusing two buffers: each piece must be consumed
    before the next is asked for. (Fresh large tensors per piece cost page faults.)"""
    block_size = key_cache.shape[2]
    step = max(block_size, MAX_PIECE_TOKENS // block_size * block_size)
    size = key_cache.shape[0] * (step + block_size) * key_cache.shape[3]  # step / bs + 1 blocks
    k_buf = key_cache.new_empty(size)
    v_buf = value_cache.new_empty(size)
    for a in range(lo, hi, step):
        b = min(a + step, hi)
        yield (_gather_blocks(key_cache, block_ids, a, b, k_buf),
               _gather_blocks(value_cache, block_ids, a, b, v_buf))


def gather_slots(key_cache: torch.Tensor, value_cache: torch.Tensor,
                 slot_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of B sequences side by side, for one padded kernel call.

    caches [Hkv, num_blocks, block_size, D]; slot_table [B, Lmax] int64 flat slots. Returns
    keys, values [B, Hkv, Lmax, D] (views of one gathered [Hkv, B * Lmax, D] tensor each)."""
    b, lmax = slot_table.shape
    k_flat, v_flat = _flat(key_cache), _flat(value_cache)
    flat_index = slot_table.reshape(-1)
    keys = k_flat.index_select(1, flat_index).view(-1, b, lmax, k_flat.shape[-1])
    values = v_flat.index_select(1, flat_index).view(-1, b, lmax, v_flat.shape[-1])
    return keys.transpose(0, 1), values.transpose(0, 1)
