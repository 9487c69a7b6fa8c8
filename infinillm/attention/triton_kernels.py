"""Triton kernels of the "triton" backend: paged attention with (out, lse), the exact merge, KV writes.

Whether these kernels are compiled for a GPU or run by Triton's interpreter (numpy, CPU tensors)
is fixed when this module is imported: `@triton.jit` reads TRITON_INTERPRET then. `INTERPRETED`
records which; triton_backend.py refuses CPU tensors when it is False.

One attention kernel serves every case. A program takes BLOCK_M query rows of one sequence and
one KV head, a row being (query position, query head of that KV head's group): a decode step's
group of heads shares every key load, and a chunk's positions fill the tile (GQA costs no extra
key traffic). It walks keys in tiles of BLOCK_N with an online softmax in float32, from two
sources:
    the cache: positions [0, n) of a table (block ids, or flat slots with table_block 1), every
        key visible to every row, an optional additive mask per key (padded decode);
    direct keys [Hkv, Lk, D] (a chunk's fresh K/V, or a micro-attention's), causal or not.
Scores live in the log2 domain (scale * log2(e) folded into one multiply, exp2 in the loop);
lse is written in natural log. A row that saw no key ends with l = 0: out 0, lse -inf.

GPU notes: tl.dot needs M, N, K >= 16, so BLOCK_M and BLOCK_D are at least 16 (a decode group of
4 heads pads its tile; decode is bound by key bytes, not by the wasted rows). float32 inputs use
input_precision="ieee" (TF32 would lose the fp32-rounding exactness); 16-bit inputs take the
tensor-core path, with p cast to the value dtype for p @ V as flash attention does, float32
accumulators throughout.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(s, v, m, l, acc):
    """Fold one key tile into the running (max m, sum l, acc), scores s [M, N] in log2 units.

    Rows that have seen only -inf so far keep m = -inf; shifting by 0 there keeps exp2 finite
    (exp2(-inf) = 0), so no -inf - -inf NaN ever forms."""
    m_new = tl.maximum(m, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(m - shift)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l, acc


@triton.jit
def _attention_kernel(
    q_ptr, out_ptr, lse_ptr,
    k_cache_ptr, v_cache_ptr, table_ptr, num_keys_ptr, mask_ptr,
    k_ptr, v_ptr,
    scale_log2, num_queries, group, head_dim, table_block, num_cache_keys, num_direct_keys,
    stride_qs, stride_ql, stride_qh,
    stride_os, stride_ol, stride_oh,
    stride_lse_s, stride_lse_h, stride_lse_l,
    stride_ch, stride_cslot,
    stride_ts, stride_ms,
    stride_kh, stride_kl, stride_kd, stride_vh, stride_vl, stride_vd,
    HAS_CACHE: tl.constexpr, KEYS_PER_SEQ: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DIRECT: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries * group
    qpos = rows // group
    head = kv_head * group + rows % group
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + seq * stride_qs + qpos[:, None] * stride_ql + head[:, None] * stride_qh
                + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_CACHE:
        if KEYS_PER_SEQ:
            n = tl.load(num_keys_ptr + seq)
        else:
            n = num_cache_keys
        k_base = k_cache_ptr + kv_head * stride_ch
        v_base = v_cache_ptr + kv_head * stride_ch
        for start in range(0, n, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            key_ok = offs < n
            entry = tl.load(table_ptr + seq * stride_ts + offs // table_block, mask=key_ok,
                            other=0)
            slot = entry.to(tl.int64) * table_block + offs % table_block
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + slot[:, None] * stride_cslot + d[None, :], mask=kv_mask,
                        other=0.0)
            v = tl.load(v_base + slot[:, None] * stride_cslot + d[None, :], mask=kv_mask,
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            if HAS_MASK:
                add = tl.load(mask_ptr + seq * stride_ms + offs, mask=key_ok, other=0.0)
                s += add[None, :] * 1.4426950408889634
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m, l, acc = _online_softmax_step(s, v, m, l, acc)

    if HAS_DIRECT:
        n_direct = num_direct_keys
        if CAUSAL:  # the tile's last query position sees keys up to itself
            last = (pid_m * BLOCK_M + BLOCK_M - 1) // group + 1
            n_direct = tl.minimum(n_direct, last)
        for start in range(0, n_direct, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            key_ok = offs < n_direct
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_head * stride_kh + offs[:, None] * stride_kl
                        + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_head * stride_vh + offs[:, None] * stride_vl
                        + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            seen = key_ok[None, :]
            if CAUSAL:
                seen = seen & (offs[None, :] <= qpos[:, None])
            s = tl.where(seen, s, float("-inf"))
            m, l, acc = _online_softmax_step(s, v, m, l, acc)

    saw = l > 0.0
    out = acc / tl.where(saw, l, 1.0)[:, None]
    lse = tl.where(saw, (m + tl.log2(tl.where(saw, l, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(out_ptr + seq * stride_os + qpos[:, None] * stride_ol + head[:, None] * stride_oh
             + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + seq * stride_lse_s + head * stride_lse_h + qpos * stride_lse_l, lse,
             mask=row_ok)


@triton.jit
def _merge_kernel(outs_ptr, lses_ptr, out_ptr, lse_ptr, num_parts, num_rows, num_q, num_h,
                  head_dim, BLOCK_D: tl.constexpr):
    """One (leading index a, query q, head h) row. outs [n, A, Lq, Hq, D], lses [n, A, Hq, Lq],
    out [A, Lq, Hq, D], lse [A, Hq, Lq], all contiguous; num_rows = A * Lq * Hq."""
    row = tl.program_id(0).to(tl.int64)  # in out's order
    h = row % num_h
    q = (row // num_h) % num_q
    a = row // (num_h * num_q)
    lse_off = (a * num_h + h) * num_q + q
    peak = tl.load(lses_ptr + lse_off)
    for j in range(1, num_parts):
        peak = tl.maximum(peak, tl.load(lses_ptr + j * num_rows + lse_off))
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    total = peak * 0.0  # a float32 scalar, like w
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j in range(0, num_parts):
        w = tl.exp(tl.load(lses_ptr + j * num_rows + lse_off) - peak)
        o = tl.load(outs_ptr + (j * num_rows + row) * head_dim + d, mask=d_ok, other=0.0)
        # Select, do not multiply: a partial that saw nothing (w = 0) may hold inf or NaN.
        acc += tl.where(w > 0.0, o.to(tl.float32) * w, 0.0)
        total += w
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + lse_off, peak + tl.log(total))


@triton.jit
def _write_kv_kernel(slots_ptr, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, head_dim,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_ch, stride_cslot,
                     BLOCK_D: tl.constexpr):
    """Row t, KV head h: key[t, h] -> k_cache[h, slots[t]] (and the same for values)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    dst = h * stride_ch + slot * stride_cslot + d
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=d_ok)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=d_ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=d_ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=d_ok)


INTERPRETED = isinstance(_attention_kernel, InterpretedFunction)


# ---- launchers --------------------------------------------------------------------------------

def _block_m(rows: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rows)))


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[Hkv, num_blocks, block_size, D] -> [Hkv, num_blocks * block_size, D], no copy."""
    return cache.view(cache.shape[0], -1, cache.shape[-1])


def _rows_last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(
    query: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    num_kv_heads: int,
    key_cache: torch.Tensor | None = None,
    value_cache: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    table_block: int = 1,
    num_keys: int | torch.Tensor = 0,
    mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    causal: bool = False,
) -> None:
    """Attention of S sequences' queries over their cache keys and/or direct keys, in one launch.

    query [S, Lq, Hq, D] (D contiguous); out [S, Lq, Hq, D] and lse [S, Hq, Lq] float32 are
    written. Cache keys (if key_cache is given): caches [Hkv, num_blocks, block_size, D], the
    first `num_keys` (an int, or int64 [S]) positions of `table` [S, W] (int32/int64), whose
    entry p // table_block holds position p at flat slot entry * table_block + p % table_block;
    so block ids with table_block = block_size, or flat slots with table_block = 1. mask
    [S, Lmax] float32 is added to those scores (additive, 0 or -inf). Direct keys (S == 1):
    key, value [Hkv, Lk, D] any strides; causal needs Lk == Lq (query i sees direct keys <= i).
    """
    s, lq, hq, d = query.shape
    group = hq // num_kv_heads
    block_m = _block_m(lq * group)
    has_cache, has_direct = key_cache is not None, key is not None
    dummy = query
    k_flat = _flat(key_cache) if has_cache else dummy
    v_flat = _flat(value_cache) if has_cache else dummy
    per_seq = isinstance(num_keys, torch.Tensor)
    grid = (triton.cdiv(lq * group, block_m), num_kv_heads, s)
    _attention_kernel[grid](
        query, out, lse,
        k_flat, v_flat, table if has_cache else dummy, num_keys if per_seq else dummy,
        mask if mask is not None else dummy,
        key if has_direct else dummy, value if has_direct else dummy,
        scale * _LOG2E, lq, group, d, table_block, 0 if per_seq else num_keys,
        key.shape[1] if has_direct else 0,
        query.stride(0), query.stride(1), query.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        k_flat.stride(0) if has_cache else 0, k_flat.stride(1) if has_cache else 0,
        table.stride(0) if has_cache else 0, mask.stride(0) if mask is not None else 0,
        *(key.stride() if has_direct else (0, 0, 0)),
        *(value.stride() if has_direct else (0, 0, 0)),
        HAS_CACHE=has_cache, KEYS_PER_SEQ=per_seq, HAS_MASK=mask is not None,
        HAS_DIRECT=has_direct, CAUSAL=causal,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=_block_d(d),
    )


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """partials.merge's contract in one launch: outs n x [..., Lq, Hq, D], lses n x [..., Hq, Lq]
    float32; returns (out in outs[0]'s dtype, lse float32). n >= 2."""
    stacked = torch.stack(outs)  # [n, ..., Lq, Hq, D] contiguous
    stacked_lse = torch.stack(lses).float()
    out = torch.empty(outs[0].shape, dtype=outs[0].dtype, device=outs[0].device)
    lse = torch.empty(lses[0].shape, dtype=torch.float32, device=outs[0].device)
    lq, hq, d = out.shape[-3:]
    num_rows = out.numel() // d if d else 0
    if num_rows:
        _merge_kernel[(num_rows,)](stacked, stacked_lse, out, lse, len(outs), num_rows, lq, hq, d,
                                   BLOCK_D=_block_d(d))
    return out, lse


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor,
             key: torch.Tensor, value: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> caches [Hkv, num_blocks, block_size, D] at flat slots [T]."""
    t, hkv, d = key.shape
    if t == 0:
        return
    key, value = _rows_last_contiguous(key), _rows_last_contiguous(value)
    k_flat, v_flat = _flat(key_cache), _flat(value_cache)
    _write_kv_kernel[(t, hkv)](slots, key, value, k_flat, v_flat, d, key.stride(0),
                               key.stride(1), value.stride(0), value.stride(1),
                               k_flat.stride(0), k_flat.stride(1), BLOCK_D=_block_d(d))


def empty_lse(shape, device) -> torch.Tensor:
    return torch.full(shape, -math.inf, dtype=torch.float32, device=device)
