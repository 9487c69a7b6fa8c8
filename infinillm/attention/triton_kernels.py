"""The "triton" backend's kernels: paged attention returning (out, lse), the exact merge, KV writes.

Whether these kernels are compiled for a GPU or run by Triton's interpreter (numpy, CPU tensors)
is fixed when triton and this module are imported: `@triton.jit` reads TRITON_INTERPRET then.
`MODE` records which; triton_backend.py refuses CPU tensors unless it is "interpreted".

One attention kernel serves every case. A program takes BLOCK_M query rows of one sequence and
one KV head, a row being (query position, query head of that KV head's group): a decode step's
group of heads shares every key load, and a chunk's positions fill the tile (GQA costs no extra
key traffic). It walks keys in tiles of BLOCK_N with an online softmax in float32, from two
sources:
    the cache: positions [0, n) of a table (block ids, or flat slots with TABLE_BLOCK 1), every
        key visible to every row, an optional additive mask per key (padded decode);
    direct keys [Hkv, Lk, D] (a chunk's fresh K/V, or a micro-attention's), causal or not.
Scores live in the log2 domain (scale * log2(e) folded into one multiply, exp2 in the loop);
lse is written in natural log. A row that saw no key ends with l_i = 0: out 0, lse -inf.
A launch with too few programs for the GPU splits the cache keys (split-K); the splits' partials
meet in the merge kernel, which is `partials.merge`'s exact merge.

GPU notes: tl.dot needs M, N, K >= 16, so BLOCK_M and BLOCK_D are at least 16 (a decode group of
4 heads pads its tile; decode is bound by key bytes, not by the wasted rows). float32 inputs use
input_precision="ieee" (TF32 would lose the fp32-rounding exactness); 16-bit inputs take the
tensor-core path, with p cast to the value dtype for p @ V as flash attention does, float32
accumulators throughout.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_LOG2E = 1.4426950408889634

# What tl.max and tl.sum reduce with, called through tl.reduce directly: the same code on a GPU,
# and under the interpreter its numpy fast path (it recognises these two combine functions)
# without the cost of a nested jit call (it re-patches the language per call: milliseconds).
_max = tl.standard._elementwise_max
_add = tl.standard._sum_combine


@triton.jit
def _attention_kernel(
    q_ptr, out_ptr, lse_ptr,
    k_cache_ptr, v_cache_ptr, table_ptr, num_keys_ptr, mask_ptr,
    k_ptr, v_ptr,
    scale_log2, num_queries, group, head_dim, num_cache_keys, num_direct_keys,
    num_splits, keys_per_split,
    stride_qs, stride_ql, stride_qh,
    stride_o_split, stride_os, stride_ol, stride_oh,
    stride_lse_split, stride_lse_s, stride_lse_h, stride_lse_l,
    stride_ch, stride_cslot,
    stride_ts, stride_ms,
    stride_kh, stride_kl, stride_kd, stride_vh, stride_vl, stride_vd,
    HAS_CACHE: tl.constexpr, KEYS_PER_SEQ: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DIRECT: tl.constexpr, CAUSAL: tl.constexpr, TABLE_BLOCK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (m tile x split, KV head, sequence). Split j takes cache keys
    [j * keys_per_split, (j + 1) * keys_per_split) and, if j == 0, the direct keys; with
    num_splits > 1 out/lse are per-split partials that the merge kernel combines."""
    pid_m = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    kv_head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    # Row and column indices in int64: addresses need it for large caches, and the interpreter
    # checks 32-bit index arithmetic for overflow at a high cost.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < num_queries * group
    qpos = rows // group
    head = kv_head * group + rows % group
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < head_dim
    q = tl.load(q_ptr + seq * stride_qs + qpos[:, None] * stride_ql + head[:, None] * stride_qh
                + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    # One loop over this program's key tiles: cache tiles first, then direct tiles, each tile
    # from one source, so that the online-softmax update below is written once.
    lo = split * keys_per_split
    hi = lo
    if HAS_CACHE:
        if KEYS_PER_SEQ:
            hi = tl.minimum(tl.load(num_keys_ptr + seq), lo + keys_per_split)
        else:
            hi = tl.minimum(num_cache_keys, lo + keys_per_split)
    cache_end = lo + (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    end = cache_end
    if HAS_DIRECT:
        n_direct = num_direct_keys
        if CAUSAL:  # the tile's last query position sees direct keys up to itself
            n_direct = tl.minimum(n_direct, (pid_m * BLOCK_M + BLOCK_M - 1) // group + 1)
        if split == 0:
            end = cache_end + n_direct
    for start in range(lo, end, BLOCK_N):
        if start < cache_end:
            # positions fit in int32 (and a constexpr TABLE_BLOCK makes // and % shifts);
            # slots may not
            offs = start + tl.arange(0, BLOCK_N)
            key_ok = offs < hi
            entry = tl.load(table_ptr + seq * stride_ts + offs // TABLE_BLOCK, mask=key_ok,
                            other=0)
            slot = entry.to(tl.int64) * TABLE_BLOCK + offs % TABLE_BLOCK
            kv_mask = key_ok[:, None] & d_ok[None, :]
            kv_off = kv_head * stride_ch + slot[:, None] * stride_cslot + d[None, :]
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision="ieee") * scale_log2
            if HAS_MASK:  # additive, natural-log units: times log2(e)
                add = tl.load(mask_ptr + seq * stride_ms + offs, mask=key_ok, other=0.0)
                s += add[None, :] * 1.4426950408889634
            s = tl.where(key_ok[None, :], s, float("-inf"))
        else:
            offs = start - cache_end + tl.arange(0, BLOCK_N).to(tl.int64)
            key_ok = offs < num_direct_keys
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_head * stride_kh + offs[:, None] * stride_kl
                        + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_head * stride_vh + offs[:, None] * stride_vl
                        + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision="ieee") * scale_log2
            seen = key_ok[None, :]
            if CAUSAL:
                seen = seen & (offs[None, :] <= qpos[:, None])
            s = tl.where(seen, s, float("-inf"))
        # Online softmax in log2 units. A row that has seen only -inf keeps m_i = -inf;
        # shifting by 0 there keeps exp2 finite (exp2(-inf) = 0): no -inf - -inf NaN forms.
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.reduce(p, 1, _add)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE),
                                             input_precision="ieee")
        m_i = m_new

    saw = l_i > 0.0
    out = acc / tl.where(saw, l_i, 1.0)[:, None]
    lse = tl.where(saw, (m_i + tl.log2(tl.where(saw, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(out_ptr + split * stride_o_split + seq * stride_os + qpos[:, None] * stride_ol
             + head[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + split * stride_lse_split + seq * stride_lse_s + head * stride_lse_h
             + qpos * stride_lse_l, lse, mask=row_ok)


@triton.jit
def _merge_kernel(outs_ptr, lses_ptr, out_ptr, lse_ptr, num_parts, num_rows, num_q, num_h,
                  head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_R rows (leading index a, query q, head h) of outs [n, A, Lq, Hq, D] and
    lses [n, A, Hq, Lq] into out [A, Lq, Hq, D] and lse [A, Hq, Lq], all contiguous;
    num_rows = A * Lq * Hq."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # out's order
    row_ok = rows < num_rows
    h = rows % num_h
    q = (rows // num_h) % num_q
    a = rows // (num_h * num_q)
    lse_off = (a * num_h + h) * num_q + q
    peak = tl.load(lses_ptr + lse_off, mask=row_ok, other=float("-inf"))
    for j in range(1, num_parts):
        peak = tl.maximum(peak, tl.load(lses_ptr + j * num_rows + lse_off, mask=row_ok,
                                        other=float("-inf")))
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    tile_ok = row_ok[:, None] & (d < head_dim)[None, :]
    total = tl.full([BLOCK_R], 0.0, tl.float32)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
    for j in range(0, num_parts):
        lse_j = tl.load(lses_ptr + j * num_rows + lse_off, mask=row_ok, other=float("-inf"))
        w = tl.exp(lse_j - peak)
        o = tl.load(outs_ptr + (j * num_rows + rows)[:, None] * head_dim + d[None, :],
                    mask=tile_ok, other=0.0)
        # Select, do not multiply: a partial that saw nothing (w = 0) may hold inf or NaN.
        acc += tl.where(w[:, None] > 0.0, o.to(tl.float32) * w[:, None], 0.0)
        total += w
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * head_dim + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=tile_ok)
    tl.store(lse_ptr + lse_off, peak + tl.log(total), mask=row_ok)


@triton.jit
def _write_kv_kernel(slots_ptr, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, num_tokens,
                     head_dim, stride_kt, stride_kh, stride_vt, stride_vh, stride_ch,
                     stride_cslot, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows t of one KV head h: key[t, h] -> k_cache[h, slots[t]] (and the same for values)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t_ok = t < num_tokens
    slot = tl.load(slots_ptr + t, mask=t_ok, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    ok = t_ok[:, None] & (d < head_dim)[None, :]
    dst = h * stride_ch + slot[:, None] * stride_cslot + d[None, :]
    k = tl.load(key_ptr + t[:, None] * stride_kt + h * stride_kh + d[None, :], mask=ok)
    v = tl.load(value_ptr + t[:, None] * stride_vt + h * stride_vh + d[None, :], mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


# Interpreted only if triton itself was imported under TRITON_INTERPRET=1: its own jit'd library
# functions (tl.zeros, tl.max, ...) are decorated at triton's import, and the interpreter cannot
# call compiled ones. "mixed" (ours interpreted, triton's compiled) runs nowhere.
_OURS = isinstance(_attention_kernel, InterpretedFunction)
_TRITONS = isinstance(tl.zeros, InterpretedFunction)
MODE = "interpreted" if _OURS and _TRITONS else "compiled" if not _OURS else "mixed"


# ---- launchers --------------------------------------------------------------------------------

def _block_m(rows: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rows)))


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_dtype(dtype: torch.dtype):
    """The dtype tl.dot multiplies in: the inputs' own, except bfloat16 under the interpreter,
    whose tl.dot (Triton 3.9) multiplies bfloat16 operands as raw 16-bit integers; there they are
    widened to float32 first, which is exact (p is still rounded to bfloat16 before p @ V, as on
    the GPU)."""
    if dtype == torch.bfloat16:
        return tl.float32 if MODE == "interpreted" else tl.bfloat16
    return {torch.float32: tl.float32, torch.float16: tl.float16}[dtype]


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[Hkv, num_blocks, block_size, D] -> [Hkv, num_blocks * block_size, D], no copy."""
    return cache.view(cache.shape[0], -1, cache.shape[-1])


def _rows_last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# Split-K (flash decoding): when a launch has too few programs to fill the GPU (decode of a few
# long sequences), each program takes one split of at least SPLIT_MIN_KEYS cache keys and the
# splits' partials meet in the merge kernel, the same exact merge as DistAttention's.
SPLIT_MIN_KEYS = 512
BLOCK_N = 64


@functools.cache
def target_programs(device: torch.device) -> int:
    """Programs a launch should have to fill `device`: two per SM on a GPU; on CPU (the
    interpreter runs programs one by one) as few as possible."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(num_programs: int, max_keys: int, device: torch.device) -> int:
    """Key splits for a launch of `num_programs` programs over up to `max_keys` cache keys."""
    most = max_keys // SPLIT_MIN_KEYS
    if most <= 1:
        return 1
    return max(1, min(most, triton.cdiv(target_programs(device), num_programs)))


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
    max_keys: int = 0,
    mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    causal: bool = False,
) -> None:
    """Attention of S sequences' queries over their cache keys and/or direct keys, in one launch
    (two with split-K: partials, then the merge).

    query [S, Lq, Hq, D] (D contiguous); out [S, Lq, Hq, D] and lse [S, Hq, Lq] float32 are
    written (contiguous if split-K may be used). Cache keys (if key_cache is given): caches
    [Hkv, num_blocks, block_size, D], the first `num_keys` (an int, or int64 [S] with max_keys
    its upper bound) positions of `table` [S, W] (int32/int64, rows contiguous), whose entry
    p // table_block holds position p at flat slot entry * table_block + p % table_block: block
    ids with table_block = block_size, or flat slots with table_block = 1. mask [S, Lmax]
    float32 (rows contiguous) is added to those scores (0 or -inf). Direct keys (S == 1): key,
    value [Hkv, Lk, D], any strides; causal needs Lk == Lq (query i sees direct keys <= i).
    """
    s, lq, hq, d = query.shape
    if s == 0 or lq == 0:
        return
    group = hq // num_kv_heads
    block_m = _block_m(lq * group)
    m_tiles = triton.cdiv(lq * group, block_m)
    has_cache, has_direct = key_cache is not None, key is not None
    per_seq = isinstance(num_keys, torch.Tensor)
    if not per_seq:
        max_keys = num_keys
    splits = num_splits(m_tiles * num_kv_heads * s, max_keys, query.device) if has_cache else 1
    keys_per_split = triton.cdiv(triton.cdiv(max_keys, splits), BLOCK_N) * BLOCK_N
    if splits > 1:  # float32 partials [splits, S, Lq, Hq, D] and [splits, S, Hq, Lq]
        part_out = torch.empty((splits, *out.shape), dtype=torch.float32, device=out.device)
        part_lse = torch.empty((splits, *lse.shape), dtype=torch.float32, device=out.device)
        dest, dest_lse = part_out, part_lse
    else:
        dest, dest_lse = out[None], lse[None]
    dummy = query
    k_flat = _flat(key_cache) if has_cache else dummy
    v_flat = _flat(value_cache) if has_cache else dummy
    _attention_kernel[(m_tiles * splits, num_kv_heads, s)](
        query, dest, dest_lse,
        k_flat, v_flat, table if has_cache else dummy, num_keys if per_seq else dummy,
        mask if mask is not None else dummy,
        key if has_direct else dummy, value if has_direct else dummy,
        scale * _LOG2E, lq, group, d, 0 if per_seq else num_keys,
        key.shape[1] if has_direct else 0, splits, keys_per_split,
        query.stride(0), query.stride(1), query.stride(2),
        *dest.stride()[:4], *dest_lse.stride(),
        k_flat.stride(0) if has_cache else 0, k_flat.stride(1) if has_cache else 0,
        table.stride(0) if has_cache else 0, mask.stride(0) if mask is not None else 0,
        *(key.stride() if has_direct else (0, 0, 0)),
        *(value.stride() if has_direct else (0, 0, 0)),
        HAS_CACHE=has_cache, KEYS_PER_SEQ=per_seq, HAS_MASK=mask is not None,
        HAS_DIRECT=has_direct, CAUSAL=causal, TABLE_BLOCK=table_block,
        DOT_DTYPE=_dot_dtype(query.dtype),
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(d),
    )
    if splits > 1:
        _merge_into(part_out, part_lse, out, lse)


def _merge_into(stacked: torch.Tensor, stacked_lse: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor) -> None:
    """stacked [n, ..., Lq, Hq, D], stacked_lse [n, ..., Hq, Lq] float32 -> out, lse, all
    contiguous."""
    lq, hq, d = out.shape[-3:]
    num_rows = out.numel() // d if d else 0
    if num_rows:
        _merge_kernel[(triton.cdiv(num_rows, 16),)](
            stacked, stacked_lse, out, lse, stacked.shape[0], num_rows, lq, hq, d,
            BLOCK_R=16, BLOCK_D=_block_d(d))


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """partials.merge's contract in one launch: outs n x [..., Lq, Hq, D], lses n x [..., Hq, Lq]
    float32; returns (out in outs[0]'s dtype, lse float32). n >= 2."""
    out = torch.empty(outs[0].shape, dtype=outs[0].dtype, device=outs[0].device)
    lse = torch.empty(lses[0].shape, dtype=torch.float32, device=outs[0].device)
    _merge_into(torch.stack(outs), torch.stack(lses).float(), out, lse)
    return out, lse


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor,
             key: torch.Tensor, value: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> caches [Hkv, num_blocks, block_size, D] at flat slots [T]."""
    t, hkv, d = key.shape
    if t == 0:
        return
    key, value = _rows_last_contiguous(key), _rows_last_contiguous(value)
    k_flat, v_flat = _flat(key_cache), _flat(value_cache)
    _write_kv_kernel[(triton.cdiv(t, 16), hkv)](
        slots, key, value, k_flat, v_flat, t, d, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), k_flat.stride(0), k_flat.stride(1), BLOCK_T=16, BLOCK_D=_block_d(d))

