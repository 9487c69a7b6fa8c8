"""micro_attention, merge and paged attention against attention computed in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinillm.attention import (
    merge,
    micro_attention,
    padded_decode_attention,
    paged_attention,
    slot_runs,
)

BACKENDS = ["torch", "cpu_flash"]


def reference(q, k, v, start_pos):
    """Causal attention in float64. q [Lq, Hq, D]; k, v [Hkv, L, D]; query i at start_pos + i."""
    lq, hq, d = q.shape
    group = hq // k.shape[0]
    kk = k.double().repeat_interleave(group, 0)
    vv = v.double().repeat_interleave(group, 0)
    scores = torch.einsum("qhd,hkd->hqk", q.double(), kk) / math.sqrt(d)
    qpos = torch.arange(start_pos, start_pos + lq)[:, None]
    kpos = torch.arange(k.shape[1])[None, :]
    scores = scores.masked_fill(kpos > qpos, -math.inf)
    out = torch.einsum("hqk,hkd->qhd", torch.softmax(scores, -1), vv)
    return out, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    seq_len=st.integers(1, 80),
    num_splits=st.integers(1, 6),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**31),
)
def test_micro_attention_merge_over_random_splits(backend, seq_len, num_splits, hkv, group, seed):
    """Decode: one query over keys cut at random points; merged partials equal float64."""
    gen = torch.Generator().manual_seed(seed)
    d = 64
    q = torch.randn(1, hkv * group, d, generator=gen)
    k = torch.randn(hkv, seq_len, d, generator=gen)
    v = torch.randn(hkv, seq_len, d, generator=gen)
    cuts = sorted(torch.randint(0, seq_len + 1, (num_splits - 1,), generator=gen).tolist())
    bounds = [0, *cuts, seq_len]  # empty pieces allowed: they must contribute nothing
    parts = [
        micro_attention(q, k[:, a:b], v[:, a:b], scale=1 / math.sqrt(d), backend=backend)
        for a, b in zip(bounds, bounds[1:])
    ]
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    ref_out, ref_lse = reference(q, k, v, start_pos=seq_len - 1)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_chunk_matches_float64(backend):
    torch.manual_seed(0)
    q = torch.randn(9, 6, 64)
    k, v = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    out, lse = micro_attention(q, k, v, causal=True, backend=backend)
    ref_out, ref_lse = reference(q, k, v, start_pos=0)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=1e-5)


def test_partial_that_saw_nothing_contributes_nothing():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 4, 64), torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    out, lse = micro_attention(q, k, v)
    empty_out, empty_lse = micro_attention(q, k[:, :0], v[:, :0])
    assert torch.isneginf(empty_lse).all() and (empty_out == 0).all()
    # a holder that returns garbage with lse -inf (a fully masked row) must not leak into out
    garbage = torch.full_like(out, 1e6)
    merged, merged_lse = merge([out, garbage, empty_out], [lse, empty_lse, empty_lse])
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    nothing, nothing_lse = merge([empty_out, empty_out], [empty_lse, empty_lse])
    assert (nothing == 0).all() and torch.isneginf(nothing_lse).all()


def test_backends_agree():
    torch.manual_seed(2)
    q, k, v = torch.randn(7, 8, 64), torch.randn(4, 7, 64), torch.randn(4, 7, 64)
    for causal in (False, True):
        a = micro_attention(q, k, v, causal=causal, backend="torch")
        b = micro_attention(q, k, v, causal=causal, backend="cpu_flash")
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


def test_slot_runs_exact():
    # positions 3..11 of a table [5, 6, 9] with blocks of 4: slot 23, 24-27 (block 6), 36-39
    assert slot_runs([5, 6, 9], 4, 3, 12) == [(23, 5), (36, 4)]
    assert slot_runs([2, 1], 4, 0, 8) == [(8, 4), (4, 4)]
    assert slot_runs([7], 1, 0, 1) == [(7, 1)]
    assert slot_runs([0, 1], 4, 4, 4) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 7, 16])
@pytest.mark.parametrize("fragmented", [False, True])
@pytest.mark.parametrize("piece_tokens", [1024, 20])
def test_paged_attention_matches_float64(backend, block_size, fragmented, piece_tokens,
                                         monkeypatch):
    """Adjacent and shuffled block tables; small pieces exercise the split and gather paths."""
    from infinillm.attention import ops, paged

    monkeypatch.setattr(ops, "_backend", backend)
    monkeypatch.setattr(paged, "MAX_PIECE_TOKENS", piece_tokens)
    monkeypatch.setattr(paged, "MIN_MEAN_RUN_TOKENS", 256 if piece_tokens > 100 else 5)
    gen = torch.Generator().manual_seed(block_size)
    hkv, hq, d, num_blocks = 2, 6, 64, 1000
    kc = torch.randn(hkv, num_blocks, block_size, d, generator=gen)
    vc = torch.randn(hkv, num_blocks, block_size, d, generator=gen)
    for seq_len, chunk in [(1, 1), (37, 1), (300, 300), (300, 45), (600, 1)]:
        n = -(-seq_len // block_size)
        if fragmented:
            ids = torch.randperm(num_blocks, generator=gen)[:n].tolist()
        else:
            ids = list(range(10, 10 + n))
        start = seq_len - chunk
        q = torch.randn(chunk, hq, d, generator=gen)
        out, lse = paged_attention(q, kc, vc, ids, start_pos=start, scale=1 / math.sqrt(d))
        k = torch.cat([kc[:, b] for b in ids], 1)[:, :seq_len]
        v = torch.cat([vc[:, b] for b in ids], 1)[:, :seq_len]
        ref_out, ref_lse = reference(q, k, v, start)
        torch.testing.assert_close(out.double(), ref_out, atol=3e-6, rtol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=3e-6, rtol=1e-5)


def test_padded_decode_matches_float64():
    gen = torch.Generator().manual_seed(5)
    hkv, hq, d, bs, num_blocks = 2, 4, 64, 7, 50
    kc = torch.randn(hkv, num_blocks, bs, d, generator=gen)
    vc = torch.randn(hkv, num_blocks, bs, d, generator=gen)
    lens = [1, 15, 40]
    tables = [torch.randperm(num_blocks, generator=gen)[: -(-n // bs)].tolist() for n in lens]
    width = max(lens)
    slot_table = torch.zeros(len(lens), width, dtype=torch.int64)
    mask = torch.zeros(len(lens), 1, 1, width)
    for i, (n, ids) in enumerate(zip(lens, tables)):
        for p in range(n):
            slot_table[i, p] = ids[p // bs] * bs + p % bs
        mask[i, ..., n:] = -math.inf
    q = torch.randn(len(lens), hq, d, generator=gen)
    out, lse = padded_decode_attention(q, kc, vc, slot_table, mask, scale=1 / math.sqrt(d))
    for i, (n, ids) in enumerate(zip(lens, tables)):
        k = torch.cat([kc[:, b] for b in ids], 1)[:, :n]
        v = torch.cat([vc[:, b] for b in ids], 1)[:, :n]
        ref_out, ref_lse = reference(q[i : i + 1], k, v, n - 1)
        torch.testing.assert_close(out[i : i + 1].double(), ref_out, atol=3e-6, rtol=1e-5)
        torch.testing.assert_close(lse[i].double(), ref_lse[:, 0], atol=3e-6, rtol=1e-5)
