"""Attention over a sequence whose K/V live in rBlocks of a block-structured cache.

Cache layout (one layer, one holder): key_cache and value_cache are [Hkv, num_blocks,
block_size, D]. Head-major storage makes a run of consecutive block ids one strided view
[Hkv, n * block_size, D], which the flash kernel reads in place; only fragmented tables pay for a
gather. Block `block_ids[i]` holds the sequence's positions [i * block_size, (i + 1) * block_size).

Query positions are [start_pos, start_pos + Lq); keys are positions [0, start_pos + Lq). The
attention is split into the prefix [0, start_pos), which every query sees, and the chunk itself,
which is causal; the two partials (and the runs of the prefix) are merged exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from infinillm.attention.ops import merge, micro_attention

# Fragmented prefixes: below this mean run length (tokens) one gather + one kernel call beats a
# kernel call per run (a call costs ~20 us; gathering a token of K and V moves 2 * Hkv * D values).
MIN_MEAN_RUN_TOKENS = 256
# Long in-place runs are cut into pieces of at most this many tokens: the CPU flash kernel runs a
# one-token query over ~1K keys faster per key than over 32K (bench/decode_attention.py),
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
    index = torch.tensor(block_ids[first : last + 1], dtype=torch.int64)
    shape = (cache.shape[0], len(index), bs, cache.shape[3])
    if out is not None:
        out = out.view(-1)[: math.prod(shape)].view(shape)
    blocks = torch.index_select(cache, 1, index, out=out)  # [Hkv, n, bs, D], contiguous
    flat = blocks.view(cache.shape[0], -1, cache.shape[3])
    return flat[:, lo - first * bs : hi - first * bs]


def _pieces(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(s + i, min(MAX_PIECE_TOKENS, n - i)) for s, n in runs
            for i in range(0, n, MAX_PIECE_TOKENS)]


def _key_values(key_cache, value_cache, block_ids, lo, hi, causal):
    """K/V of positions [lo, hi) as an iterable of ([Hkv, n, D], [Hkv, n, D]) pieces.

    The causal chunk is one piece (the kernel needs it whole). A prefix stored in long runs is
    read in place, cut into pieces of at most MAX_PIECE_TOKENS; a fragmented one is gathered
    piece by piece, so that each piece is still in cache when the kernel reads it.
    """
    block_size = key_cache.shape[2]
    runs = slot_runs(block_ids, block_size, lo, hi)
    if len(runs) == 1 and (causal or runs[0][1] <= MAX_PIECE_TOKENS):
        return [(_view(_flat(key_cache), runs[0]), _view(_flat(value_cache), runs[0]))]
    if not causal and (hi - lo) / len(runs) >= MIN_MEAN_RUN_TOKENS:
        k_flat, v_flat = _flat(key_cache), _flat(value_cache)
        return [(_view(k_flat, r), _view(v_flat, r)) for r in _pieces(runs)]
    if causal:
        return [(_gather_blocks(key_cache, block_ids, lo, hi),
                 _gather_blocks(value_cache, block_ids, lo, hi))]
    return _gathered_pieces(key_cache, value_cache, block_ids, lo, hi)


def _gathered_pieces(key_cache, value_cache, block_ids, lo, hi):
    """Yield gathered pieces one at a time, reusing two buffers: each piece must be consumed
    before the next is asked for. (Fresh large tensors per piece cost page faults.)"""
    block_size = key_cache.shape[2]
    step = max(block_size, MAX_PIECE_TOKENS // block_size * block_size)
    size = key_cache.shape[0] * (step + block_size) * block_size * key_cache.shape[3]
    k_buf = key_cache.new_empty(size)
    v_buf = value_cache.new_empty(size)
    for a in range(lo, hi, step):
        b = min(a + step, hi)
        yield (_gather_blocks(key_cache, block_ids, a, b, k_buf),
               _gather_blocks(value_cache, block_ids, a, b, v_buf))


def blocks_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: Sequence[int],
    num_tokens: int,
    *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `query` over the first `num_tokens` slots of `block_ids`, all visible.

    This is a holder's micro-attention: the keys are a request's earlier positions that this
    holder stores (their order does not matter, RoPE is already in the cached keys).
    query [Lq, Hq, D]; caches [Hkv, num_blocks, block_size, D]; returns (out [Lq, Hq, D],
    lse [Hq, Lq] float32), lse -inf for num_tokens == 0.
    """
    if len(block_ids) * key_cache.shape[2] < num_tokens:
        raise ValueError(f"{len(block_ids)} blocks of {key_cache.shape[2]} cannot hold "
                         f"{num_tokens} tokens")
    if num_tokens == 0:
        return micro_attention(query, key_cache[:, :0, 0], value_cache[:, :0, 0], scale=scale)
    parts = [micro_attention(query, k, v, scale=scale)
             for k, v in _key_values(key_cache, value_cache, block_ids, 0, num_tokens, False)]
    return merge([p[0] for p in parts], [p[1] for p in parts])


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: Sequence[int],
    *,
    start_pos: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of one sequence's chunk over its blocks, all on this holder.

    query [Lq, Hq, D] at positions [start_pos, start_pos + Lq); caches [Hkv, num_blocks,
    block_size, D]; returns (out [Lq, Hq, D], lse [Hq, Lq] float32). The chunk's own K/V must
    already be written to the cache.
    """
    block_size = key_cache.shape[2]
    end = start_pos + query.shape[0]
    if len(block_ids) * block_size < end:
        raise ValueError(f"{len(block_ids)} blocks of {block_size} cannot hold {end} positions")
    prefix = blocks_attention(query, key_cache, value_cache,
                              block_ids[: -(-start_pos // block_size)], start_pos, scale=scale)
    ((k, v),) = _key_values(key_cache, value_cache, block_ids, start_pos, end, True)
    chunk = micro_attention(query, k, v, scale=scale, causal=True)
    return merge([prefix[0], chunk[0]], [prefix[1], chunk[1]])


def padded_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_table: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token for each of B sequences in one kernel call.

    query [B, Hq, D]; slot_table [B, Lmax] int64 flat slots (padding points at any valid
    slot); mask [B, 1, 1, Lmax] float additive (0 for keys, -inf for padding; every row has at
    least one key). Returns (out [B, Hq, D], lse [B, Hq] float32).
    """
    b, lmax = slot_table.shape
    k_flat, v_flat = _flat(key_cache), _flat(value_cache)
    flat_index = slot_table.reshape(-1)
    keys = k_flat.index_select(1, flat_index).view(-1, b, lmax, k_flat.shape[-1])
    values = v_flat.index_select(1, flat_index).view(-1, b, lmax, v_flat.shape[-1])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.unsqueeze(2), keys.transpose(0, 1), values.transpose(0, 1),
        dropout_p=0.0, is_causal=False, attn_mask=mask.to(query.dtype), scale=scale,
    )[:2]
    return out[:, :, 0], lse[:, :, 0]
