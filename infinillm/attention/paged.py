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

from collections.abc import Sequence

import torch

from infinillm.attention.ops import merge, micro_attention

# Fragmented prefixes: below this mean run length (tokens) one gather + one kernel call beats a
# kernel call per run (a call costs ~20 us; gathering a token of K and V moves 2 * Hkv * D values).
MIN_MEAN_RUN_TOKENS = 256


def slot_runs(block_ids: Sequence[int], block_size: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Maximal contiguous ranges of flat cache slots holding positions [lo, hi).

    Returns (first_slot, num_slots) pairs in position order; a flat slot is
    block_id * block_size + offset.
    """
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
    return runs


def _flat(cache: torch.Tensor) -> torch.Tensor:
    hkv, num_blocks, block_size, d = cache.shape
    return cache.view(hkv, num_blocks * block_size, d)


def _gather(cache_flat: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    if len(runs) == 1:
        start, n = runs[0]
        return cache_flat[:, start : start + n]
    index = torch.cat([torch.arange(s, s + n) for s, n in runs])
    return cache_flat.index_select(1, index)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: Sequence[int],
    *,
    start_pos: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of one sequence's chunk over its blocks.

    query [Lq, Hq, D]; caches [Hkv, num_blocks, block_size, D]; returns (out [Lq, Hq, D],
    lse [Hq, Lq] float32). The chunk's own K/V must already be written to the cache.
    """
    block_size = key_cache.shape[2]
    end = start_pos + query.shape[0]
    if len(block_ids) * block_size < end:
        raise ValueError(f"{len(block_ids)} blocks of {block_size} cannot hold {end} positions")
    k_flat, v_flat = _flat(key_cache), _flat(value_cache)
    outs, lses = [], []
    for lo, hi, causal in ((0, start_pos, False), (start_pos, end, True)):
        if hi <= lo:
            continue
        runs = slot_runs(block_ids, block_size, lo, hi)
        if causal or len(runs) == 1 or (hi - lo) / len(runs) < MIN_MEAN_RUN_TOKENS:
            groups = [runs]
        else:
            groups = [[r] for r in runs]
        for group in groups:
            out, lse = micro_attention(
                query, _gather(k_flat, group), _gather(v_flat, group), scale=scale, causal=causal
            )
            outs.append(out)
            lses.append(lse)
    return merge(outs, lses)


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
