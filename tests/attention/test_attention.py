"""Every attention backend's operations, and merge, against attention computed in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinillm.attention import backend_names, get_backend, merge, slot_runs

# "triton" has its own tests (test_triton_backend.py): on CPU it runs under Triton's interpreter,
# far too slow for the property tests here.
BACKENDS = [name for name in backend_names() if name not in ("auto", "triton")]


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


def assert_matches(out, lse, ref_out, ref_lse, atol=3e-6):
    assert lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=1e-5)


def sequence_kv(kc, vc, ids, n):
    """Positions [0, n) of a block table, gathered: [Hkv, n, D] each."""
    return (torch.cat([kc[:, b] for b in ids], 1)[:, :n],
            torch.cat([vc[:, b] for b in ids], 1)[:, :n])


@pytest.fixture(params=BACKENDS)
def attention(request):
    return get_backend(request.param)


@pytest.fixture
def small_pieces(request, monkeypatch):
    """Cut block runs into pieces of `request.param` tokens (and gather fragmented tables at a
    lower threshold), so that short sequences take the split and gather paths."""
    from infinillm.attention import blocks

    monkeypatch.setattr(blocks, "MAX_PIECE_TOKENS", request.param)
    monkeypatch.setattr(blocks, "MIN_MEAN_RUN_TOKENS", 256 if request.param > 100 else 5)


# ---- micro-attention and merge ----------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    seq_len=st.integers(1, 80),
    num_splits=st.integers(1, 6),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**31),
)
def test_micro_attention_merge_over_random_splits(name, seq_len, num_splits, hkv, group, seed):
    """Decode: one query over keys cut at random points; merged partials equal float64."""
    attention = get_backend(name)
    gen = torch.Generator().manual_seed(seed)
    d = 64
    q = torch.randn(1, hkv * group, d, generator=gen)
    k = torch.randn(hkv, seq_len, d, generator=gen)
    v = torch.randn(hkv, seq_len, d, generator=gen)
    cuts = sorted(torch.randint(0, seq_len + 1, (num_splits - 1,), generator=gen).tolist())
    bounds = [0, *cuts, seq_len]  # empty pieces allowed: they must contribute nothing
    parts = [attention.micro_attention(q, k[:, a:b], v[:, a:b], scale=1 / math.sqrt(d))
             for a, b in zip(bounds, bounds[1:])]
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    assert_matches(out, lse, *reference(q, k, v, start_pos=seq_len - 1), atol=2e-6)


def test_causal_chunk_matches_float64(attention):
    torch.manual_seed(0)
    q = torch.randn(9, 6, 64)
    k, v = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    out, lse = attention.micro_attention(q, k, v, causal=True)
    assert_matches(out, lse, *reference(q, k, v, start_pos=0), atol=2e-6)


def test_causal_needs_square(attention):
    q, k = torch.randn(3, 2, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="Lq == Lk, got 3 and 4"):
        attention.micro_attention(q, k, k, causal=True)


def test_partial_that_saw_nothing_contributes_nothing(attention):
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 4, 64), torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    out, lse = attention.micro_attention(q, k, v)
    empty_out, empty_lse = attention.micro_attention(q, k[:, :0], v[:, :0])
    assert torch.isneginf(empty_lse).all() and (empty_out == 0).all()
    # a holder that returns garbage with lse -inf (a fully masked row) must not leak into out
    garbage = torch.full_like(out, 1e6)
    merged, merged_lse = merge([out, garbage, empty_out], [lse, empty_lse, empty_lse])
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    nothing, nothing_lse = merge([empty_out, empty_out], [empty_lse, empty_lse])
    assert (nothing == 0).all() and torch.isneginf(nothing_lse).all()


@pytest.mark.parametrize("poison", [math.inf, -math.inf, math.nan])
def test_a_partial_with_lse_minus_inf_is_left_out_whatever_its_out_holds(poison):
    """Select, do not multiply: 0 * inf and 0 * NaN are NaN, and must not reach the output."""
    gen = torch.Generator().manual_seed(2)
    outs = [torch.randn(3, 4, 8, generator=gen) for _ in range(3)]
    lses = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    lses[1] = lses[1].clone()
    lses[1][:, 1] = -math.inf  # partial 1 saw nothing for query 1 ...
    outs[1] = outs[1].clone()
    outs[1][1] = poison  # ... and its out there is poison
    out, lse = merge(outs, lses)
    # float64 reference, summing only the partials that saw something
    for i in range(3):
        seen = [j for j in range(3) if not (j == 1 and i == 1)]
        ref_lse = torch.logsumexp(torch.stack([lses[j][:, i].double() for j in seen]), dim=0)
        ref = sum(torch.exp(lses[j][:, i].double() - ref_lse)[:, None] * outs[j][i].double()
                  for j in seen)
        torch.testing.assert_close(out[i].double(), ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse[:, i].double(), ref_lse, atol=1e-6, rtol=1e-5)


def test_a_padded_decode_row_without_keys_reports_lse_minus_inf(attention):
    """At the backend boundary a row whose keys are all masked saw nothing: out 0, lse -inf
    (ATen's CPU flash kernel itself reports lse 0 for it), so a merge leaves it out."""
    gen, kc, vc = block_cache(5, 4, hkv=2, num_blocks=8)
    slot_table, mask = padded_tables([5, 3], [[0, 1], [2]], 4)
    mask[1] = -math.inf  # row 1: every key masked
    q = torch.randn(2, 4, 64, generator=gen)
    out, lse = attention.padded_decode_attention(q, kc, vc, slot_table, mask, scale=1 / 8)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    assert torch.isfinite(lse[0]).all()
    ref_out, ref_lse = reference(q[:1], *sequence_kv(kc, vc, [0, 1], 5), 4)
    assert_matches(out[:1], lse[0], ref_out, ref_lse[:, 0])
    # as one query's partial ([Lq=1, Hq, D], lse [Hq, 1]) beside a holder's that saw keys
    seen_out, seen_lse = torch.ones_like(out[1:]), torch.zeros_like(lse[1:].T)
    merged, merged_lse = merge([out[1:], seen_out], [lse[1:].T, seen_lse])
    torch.testing.assert_close(merged, seen_out)
    torch.testing.assert_close(merged_lse, seen_lse)


def test_slot_runs_exact():
    # positions 3..11 of a table [5, 6, 9] with blocks of 4: slot 23, 24-27 (block 6), 36-39
    assert slot_runs([5, 6, 9], 4, 3, 12) == [(23, 5), (36, 4)]
    assert slot_runs([2, 1], 4, 0, 8) == [(8, 4), (4, 4)]
    assert slot_runs([7], 1, 0, 1) == [(7, 1)]
    assert slot_runs([0, 1], 4, 4, 4) == []


# ---- over blocks ------------------------------------------------------------------------------

def block_cache(seed, block_size, hkv=2, d=64, num_blocks=1000):
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn(hkv, num_blocks, block_size, d, generator=gen)
    vc = torch.randn(hkv, num_blocks, block_size, d, generator=gen)
    return gen, kc, vc


def table(gen, num_tokens, block_size, fragmented, num_blocks=1000, first=10):
    n = -(-num_tokens // block_size)
    if fragmented:
        return torch.randperm(num_blocks, generator=gen)[:n].tolist()
    return list(range(first, first + n))


@pytest.mark.parametrize("block_size", [1, 7, 16])
@pytest.mark.parametrize("fragmented", [False, True])
@pytest.mark.parametrize("small_pieces", [1024, 20], indirect=True)
def test_blocks_attention_matches_float64(attention, block_size, fragmented, small_pieces):
    """A holder's micro-attention: every query sees every stored position."""
    gen, kc, vc = block_cache(block_size, block_size)
    for num_tokens, lq in [(1, 1), (37, 1), (300, 45), (600, 1)]:
        ids = table(gen, num_tokens, block_size, fragmented)
        q = torch.randn(lq, 6, 64, generator=gen)
        out, lse = attention.blocks_attention(q, kc, vc, ids, num_tokens, scale=1 / 8)
        k, v = sequence_kv(kc, vc, ids, num_tokens)
        assert_matches(out, lse, *reference(q, k, v, start_pos=num_tokens))


def test_blocks_attention_over_nothing(attention):
    _, kc, vc = block_cache(0, 4, num_blocks=3)
    out, lse = attention.blocks_attention(torch.randn(2, 4, 64), kc, vc, [], 0, scale=1 / 8)
    assert (out == 0).all() and torch.isneginf(lse).all()
    with pytest.raises(ValueError, match="2 blocks of 4 cannot hold 9 tokens"):
        attention.blocks_attention(torch.randn(2, 4, 64), kc, vc, [0, 1], 9, scale=1 / 8)


def split_prefix(gen, kc, vc, ids, start, other_kc, other_vc):
    """Move every third block of the prefix [0, start) to another holder's cache.

    Returns (local table, its tokens), (other table, its tokens). Only a table's last block
    may be partly filled, and the prefix's last block is the last of whichever table has it."""
    bs = kc.shape[2]
    local, other = ([], 0), ([], 0)
    free = iter(torch.randperm(other_kc.shape[1], generator=gen).tolist())
    for i in range(-(-start // bs)):
        n = min(bs, start - i * bs)
        if i % 3 == 2:
            b = next(free)
            other_kc[:, b, :n], other_vc[:, b, :n] = kc[:, ids[i], :n], vc[:, ids[i], :n]
            other = (other[0] + [b], other[1] + n)
        else:
            local = (local[0] + [ids[i]], local[1] + n)
    return local, other


@pytest.mark.parametrize("block_size", [1, 7, 16])
@pytest.mark.parametrize("fragmented", [False, True])
@pytest.mark.parametrize("small_pieces", [1024, 20], indirect=True)
def test_chunk_attention_matches_float64(attention, block_size, fragmented, small_pieces):
    """The worker's path for one request: its chunk (fresh K/V) causally over itself, its
    prefix stored here, and the prefix blocks on another holder, whose partial is merged in."""
    gen, kc, vc = block_cache(100 + block_size, block_size)
    _, other_kc, other_vc = block_cache(200 + block_size, block_size)
    for seq_len, chunk in [(1, 1), (37, 1), (300, 300), (300, 45), (600, 1)]:
        start = seq_len - chunk
        ids = table(gen, seq_len, block_size, fragmented)
        k, v = sequence_kv(kc, vc, ids, seq_len)
        q = torch.randn(chunk, 6, 64, generator=gen)
        (local_ids, num_local), (other_ids, num_other) = split_prefix(
            gen, kc, vc, ids, start, other_kc, other_vc)
        partials = [attention.blocks_attention(q, other_kc, other_vc, other_ids, num_other,
                                               scale=1 / 8)] if other_ids else []
        out, lse = attention.chunk_attention(q, k[:, start:], v[:, start:], kc, vc, local_ids,
                                             num_local, scale=1 / 8, partials=partials)
        assert_matches(out, lse, *reference(q, k, v, start))
        # the same request with its whole prefix here
        out, lse = attention.chunk_attention(q, k[:, start:], v[:, start:], kc, vc, ids, start,
                                             scale=1 / 8)
        assert_matches(out, lse, *reference(q, k, v, start))


# ---- padded decode ----------------------------------------------------------------------------

def padded_tables(lens, tables, bs):
    """slot_table [B, Lmax] and mask [B, 1, 1, Lmax] as the worker builds them."""
    width = max(lens)
    slot_table = torch.zeros(len(lens), width, dtype=torch.int64)
    mask = torch.zeros(len(lens), 1, 1, width)
    for i, (n, ids) in enumerate(zip(lens, tables)):
        for p in range(n):
            slot_table[i, p] = ids[p // bs] * bs + p % bs
        mask[i, ..., n:] = -math.inf
    return slot_table, mask


@pytest.mark.parametrize("lens", [[1], [1, 15, 40], [40, 1, 1, 7], [33, 33]])
@pytest.mark.parametrize("group", [1, 2])
def test_padded_decode_matches_float64(attention, lens, group):
    """Ragged contexts in one call, a context of one token among them."""
    bs, hkv = 7, 2
    gen, kc, vc = block_cache(len(lens) + group, bs, hkv=hkv, num_blocks=50)
    tables = [torch.randperm(50, generator=gen)[: -(-n // bs)].tolist() for n in lens]
    slot_table, mask = padded_tables(lens, tables, bs)
    q = torch.randn(len(lens), hkv * group, 64, generator=gen)
    out, lse = attention.padded_decode_attention(q, kc, vc, slot_table, mask, scale=1 / 8)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    for i, (n, ids) in enumerate(zip(lens, tables)):
        ref_out, ref_lse = reference(q[i : i + 1], *sequence_kv(kc, vc, ids, n), n - 1)
        assert_matches(out[i : i + 1], lse[i], ref_out, ref_lse[:, 0])


# ---- backends against each other ---------------------------------------------------------------

def test_backends_agree():
    """Every operation, every backend, against the torch reference on the same inputs."""
    gen, kc, vc = block_cache(2, 16, hkv=4, num_blocks=64)
    q, k, v = torch.randn(7, 8, 64), torch.randn(4, 7, 64), torch.randn(4, 7, 64)
    ids = torch.randperm(64, generator=gen)[:20].tolist()
    slot_table, mask = padded_tables([300, 1, 77], [ids, ids[:1], ids[5:]], 16)
    calls = {
        "micro": lambda a: a.micro_attention(q, k, v),
        "causal": lambda a: a.micro_attention(q, k, v, causal=True),
        "blocks": lambda a: a.blocks_attention(q, kc, vc, ids, 310, scale=1 / 8),
        "chunk": lambda a: a.chunk_attention(q, k, v, kc, vc, ids, 290, scale=1 / 8),
        "padded": lambda a: a.padded_decode_attention(q[:3], kc, vc, slot_table, mask,
                                                      scale=1 / 8),
    }
    reference_backend = get_backend("torch")
    for name in BACKENDS:
        for what, call in calls.items():
            (out, lse), (ref_out, ref_lse) = call(get_backend(name)), call(reference_backend)
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=f"{name} {what}")
            torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5, msg=f"{name} {what}")
