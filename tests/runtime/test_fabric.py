"""The in-process fabric: a holder's partial attention, K/V writes, stats, and block moves.

K/V are placed into each instance's KVStorage by hand (by position, through the block table),
and every partial is compared with attention computed in float64 from the same values: a
holder's (out, lse) is attention over exactly the positions it stores, and merging it with the
owner's own partials gives attention over the whole sequence.
"""

from __future__ import annotations

import torch

from infinillm.attention import get_backend, merge
from infinillm.kvcache import KVStorage
from infinillm.runtime.fabric import InProcFabric, serve
from infinillm.runtime.traffic import Prefix, RemoteItem, RemoteWork, remote_work
from infinillm.types import BlockId, BlockMove, InstanceId, RequestId, ScheduledChunk

LAYERS, HKV, HQ, D, BS, NUM_BLOCKS = 2, 2, 4, 8, 4, 6
SCALE = 0.3  # not 1/sqrt(D): shows that the caller's scale is the one used
A, B, C = InstanceId(0), InstanceId(1), InstanceId(2)
FLOAT = 4  # bytes per float32
ATTENTION = get_backend("auto")  # the default CPU backend; the holder computes with it


def storage() -> KVStorage:
    return KVStorage(LAYERS, HKV, D, NUM_BLOCKS, BS, torch.float32)


def fabric_of(num_instances: int) -> InProcFabric:
    fabric = InProcFabric()
    for i in range(num_instances):
        fabric.register(InstanceId(i), storage(), ATTENTION)
    return fabric


def table(*pairs: tuple[int, int]) -> list[tuple[InstanceId, BlockId]]:
    return [(InstanceId(i), BlockId(b)) for i, b in pairs]


def place(fabric: InProcFabric, layer: int, blocks, keys: torch.Tensor,
          values: torch.Tensor) -> None:
    """Store positions 0..len(keys)-1 of a request where its block table puts them."""
    for pos in range(len(keys)):
        holder, block = blocks[pos // BS]
        fabric.storages[holder].keys[layer, :, block, pos % BS] = keys[pos]
        fabric.storages[holder].values[layer, :, block, pos % BS] = values[pos]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int],
              k_pos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention of q [Lq, HQ, D] at positions q_pos over k/v [Lk, HKV, D] at k_pos,
    causal by position (a key is seen if its position <= the query's); GQA maps query head h to
    key head h // (HQ // HKV). Returns out [Lq, HQ, D], lse [HQ, Lq], both float64."""
    kk = k.double().repeat_interleave(HQ // HKV, dim=1)
    vv = v.double().repeat_interleave(HQ // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * SCALE
    hidden = torch.tensor(k_pos)[None, :] > torch.tensor(q_pos)[:, None]  # [Lq, Lk]
    scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), vv)
    return out, lse


def assert_close(partial: tuple[torch.Tensor, torch.Tensor],
                 expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    out, lse = partial
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == expected[0].shape and lse.shape == expected[1].shape
    torch.testing.assert_close(out.double(), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), expected[1], rtol=1e-5, atol=1e-5)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_holder_partial_and_merge_equal_float64_attention():
    fabric = fabric_of(2)
    # Positions 0..3 local in block 2; 4..7 on instance 1 block 4; 8..11 on instance 1 block 1,
    # of which 8, 9 are cached and 10, 11 are written now; 12 goes to local block 5.
    blocks = table((0, 2), (1, 4), (1, 1), (0, 5))
    c = ScheduledChunk(RequestId("r"), [0, 0, 0], 10, blocks, sample=True)
    keys, values, q = randn(13, HKV, D, seed=1), randn(13, HKV, D, seed=2), randn(3, HQ, D, seed=3)
    for layer in range(LAYERS):
        place(fabric, layer, blocks, keys[:10] + layer, values[:10] - layer)
    before = {i: (s.keys.clone(), s.values.clone()) for i, s in fabric.storages.items()}
    outgoing = remote_work(A, [c], 0, BS)
    # Holder 1 stores rows 0, 1 (positions 10, 11) at slots 1*4+2, 1*4+3 and answers the 3
    # queries over its prefix: block 4 (positions 4..7), block 1's first 2 (positions 8, 9).
    assert outgoing == {B: RemoteWork([0, 1], [6, 7], [RemoteItem(0, 3, Prefix([4, 1], 6))])}

    q_pos = [10, 11, 12]
    for layer in range(LAYERS):
        k, v = keys + layer, values - layer
        got = fabric.exchange(A, layer, outgoing, q, k[10:], v[10:], SCALE)
        assert list(got) == [B] and len(got[B]) == 1
        remote = got[B][0]
        # Every query sees all of the holder's positions (4..9 < 10), none of the others.
        assert_close(remote, reference(q, k[4:10], v[4:10], q_pos, list(range(4, 10))))
        # The owner's own partials: its prefix block (0..3) and the chunk itself (causal).
        local = reference(q, k[:4], v[:4], q_pos, list(range(4)))
        own = reference(q, k[10:], v[10:], q_pos, q_pos)
        parts = [local, remote, own]
        out, lse = merge([p[0].float() for p in parts], [p[1].float() for p in parts])
        assert_close((out, lse), reference(q, k, v, q_pos, list(range(13))))

    # Exactly the two written slots changed: instance 1, block 1, offsets 2 and 3, every layer;
    # the owner's storage is its worker's business, not the fabric's.
    expected_k, expected_v = before[B]
    for layer in range(LAYERS):
        expected_k[layer, :, 1, 2:4] = (keys[10:12] + layer).transpose(0, 1)
        expected_v[layer, :, 1, 2:4] = (values[10:12] - layer).transpose(0, 1)
    assert torch.equal(fabric.storages[B].keys, expected_k)
    assert torch.equal(fabric.storages[B].values, expected_v)
    assert torch.equal(fabric.storages[A].keys, before[A][0])
    assert torch.equal(fabric.storages[A].values, before[A][1])

    # Per layer: K and V of 2 rows (2 * 2 * HKV * D floats), 3 query rows out and 3 back
    # (2 * 3 * HQ * D), the lse (HQ * 3): (64 + 192 + 12) * 4 = 1072 bytes.
    stats = fabric.stats
    assert (stats.remote_attention_calls, stats.remote_attention_items) == (LAYERS, LAYERS)
    assert stats.remote_kv_writes == LAYERS
    assert stats.bytes_sent == LAYERS * (2 * 2 * HKV * D + 2 * 3 * HQ * D + HQ * 3) * FLOAT
    assert stats.bytes_sent == LAYERS * 1072
    assert stats.per_pair_calls == {(A, B): LAYERS}
    assert stats.blocks_moved == 0


def test_two_requests_over_two_holders_and_a_write_only_holder():
    fabric = fabric_of(4)
    # r: decode at position 9; 0..3 on instance 1, 4..7 on 2, 8..9 local (block 0).
    # s: 2 tokens at 6, 7; 0..3 on instance 2 (block 3), 4..7 local (block 1).
    # t: decode at 4 into instance 3's block 5; its prefix (block 2) is local.
    r_blocks, s_blocks = table((1, 0), (2, 2), (0, 0)), table((2, 3), (0, 1))
    t_blocks = table((0, 2), (3, 5))
    chunks = [ScheduledChunk(RequestId("r"), [1], 9, r_blocks, sample=True),
              ScheduledChunk(RequestId("s"), [1, 2], 6, s_blocks, sample=True),
              ScheduledChunk(RequestId("t"), [1], 4, t_blocks, sample=True)]
    rk, rv = randn(10, HKV, D, seed=4), randn(10, HKV, D, seed=5)
    sk, sv = randn(8, HKV, D, seed=6), randn(8, HKV, D, seed=7)
    tk, tv = randn(5, HKV, D, seed=8), randn(5, HKV, D, seed=9)
    layer = 1
    place(fabric, layer, r_blocks, rk[:9], rv[:9])
    place(fabric, layer, s_blocks, sk[:6], sv[:6])
    place(fabric, layer, t_blocks, tk[:4], tv[:4])
    # Batch rows: r at 0, s at 1..2, t at 3; only t's row goes anywhere (to instance 3).
    q = randn(4, HQ, D, seed=10)
    k = torch.cat([rk[9:], sk[6:], tk[4:]])
    v = torch.cat([rv[9:], sv[6:], tv[4:]])
    outgoing = remote_work(A, chunks, 0, BS)
    assert outgoing == {
        B: RemoteWork([], [], [RemoteItem(0, 1, Prefix([0], 4))]),
        C: RemoteWork([], [], [RemoteItem(0, 1, Prefix([2], 4)),
                               RemoteItem(1, 2, Prefix([3], 4))]),
        InstanceId(3): RemoteWork([3], [5 * 4 + 0], []),
    }
    got = fabric.exchange(A, layer, outgoing, q, k, v, SCALE)
    assert list(got) == [B, C, InstanceId(3)]
    assert_close(got[B][0], reference(q[0:1], rk[0:4], rv[0:4], [9], list(range(4))))
    assert_close(got[C][0], reference(q[0:1], rk[4:8], rv[4:8], [9], list(range(4, 8))))
    assert_close(got[C][1], reference(q[1:3], sk[0:4], sv[0:4], [6, 7], list(range(4))))
    assert got[InstanceId(3)] == []
    # Instance 3 held nothing before: now exactly t's new row, at layer 1, block 5, offset 0.
    held, expected_k, expected_v = fabric.storages[InstanceId(3)], storage().keys, storage().values
    expected_k[layer, :, 5, 0], expected_v[layer, :, 5, 0] = tk[4], tv[4]
    assert torch.equal(held.keys, expected_k) and torch.equal(held.values, expected_v)
    # Two holders answered (B with 1 item, C with 2); instance 3 only stored a row.
    # Bytes: B: q 1 row, out 1 row, lse (2 * HQ * D + HQ); C: 3 rows each way, 3 lse;
    # instance 3: one K and one V row (2 * HKV * D).
    stats = fabric.stats
    assert (stats.remote_attention_calls, stats.remote_attention_items) == (2, 3)
    assert stats.remote_kv_writes == 1
    assert stats.per_pair_calls == {(A, B): 1, (A, C): 1}
    expected_bytes = (2 * HQ * D + HQ) + 3 * (2 * HQ * D + HQ) + 2 * HKV * D
    assert stats.bytes_sent == expected_bytes * FLOAT


def test_serve_writes_rows_at_their_slots_and_answers_each_item():
    s = storage()
    keys, values = randn(NUM_BLOCKS * BS, HKV, D, seed=11), randn(NUM_BLOCKS * BS, HKV, D, seed=12)
    for slot in range(NUM_BLOCKS * BS):
        s.keys[0, :, slot // BS, slot % BS] = keys[slot]
        s.values[0, :, slot // BS, slot % BS] = values[slot]
    # Two items over different runs of blocks (3 then 0: the table order, not id order) and
    # two rows written to block 5 (slots 21 and 23).
    work = RemoteWork(write_rows=[0, 1], write_slots=[21, 23],
                      items=[RemoteItem(0, 2, Prefix([3, 0], 7)), RemoteItem(2, 1, Prefix([4], 1))])
    new_k, new_v = randn(2, HKV, D, seed=13), randn(2, HKV, D, seed=14)
    q = randn(3, HQ, D, seed=15)
    partials = serve(s, ATTENTION, 0, work, new_k, new_v, [q[0:2], q[2:3]], SCALE)
    seen = [12, 13, 14, 15, 0, 1, 2]  # block 3's four slots, then block 0's first three
    assert_close(partials[0], reference(q[0:2], keys[seen], values[seen], [99, 99], seen))
    assert_close(partials[1], reference(q[2:3], keys[16:17], values[16:17], [99], [16]))
    assert torch.equal(s.keys[0, :, 5, 1], new_k[0]) and torch.equal(s.keys[0, :, 5, 3], new_k[1])
    assert torch.equal(s.values[0, :, 5, 1], new_v[0])
    assert torch.equal(s.values[0, :, 5, 3], new_v[1])
    untouched = torch.ones(NUM_BLOCKS, BS, dtype=torch.bool)
    untouched[5, 1] = untouched[5, 3] = False
    expected_k = keys.view(NUM_BLOCKS, BS, HKV, D).permute(2, 0, 1, 3)
    assert torch.equal(s.keys[0][:, untouched], expected_k[:, untouched])
    assert torch.equal(s.keys[1], torch.zeros_like(s.keys[1]))  # other layers untouched


def fill(fabric: InProcFabric) -> None:
    """Distinct values everywhere: every (instance, layer, head, block, offset, dim) differs."""
    for i, s in fabric.storages.items():
        n = s.keys.numel()
        s.keys.copy_(torch.arange(n, dtype=torch.float32).view_as(s.keys) + 100_000 * i)
        s.values.copy_(-s.keys)


def test_move_blocks_copies_every_layer_and_swaps_in_one_call():
    fabric = fabric_of(3)
    fill(fabric)
    before = {i: (s.keys.clone(), s.values.clone()) for i, s in fabric.storages.items()}
    rid = RequestId("r")
    moves = [
        BlockMove(rid, A, 0, (B, BlockId(2)), (A, BlockId(4))),  # recall a block home
        BlockMove(rid, A, 1, (A, BlockId(1)), (C, BlockId(3))),  # swap across instances:
        BlockMove(rid, A, 2, (C, BlockId(3)), (A, BlockId(1))),  # (0, 1) <-> (2, 3)
        BlockMove(rid, A, 3, (B, BlockId(0)), (B, BlockId(5))),  # swap within instance 1:
        BlockMove(rid, A, 4, (B, BlockId(5)), (B, BlockId(0))),  # (1, 0) <-> (1, 5)
    ]
    fabric.move_blocks(moves)
    expected = {i: (k.clone(), v.clone()) for i, (k, v) in before.items()}
    for m in moves:  # from the copies taken before the call: all reads precede all writes
        for new, old in zip(expected[m.dst[0]], before[m.src[0]]):
            new[:, :, m.dst[1]] = old[:, :, m.src[1]]
    for i, s in fabric.storages.items():
        assert torch.equal(s.keys, expected[i][0]), i
        assert torch.equal(s.values, expected[i][1]), i
    # Spot checks of the reference itself: the swapped blocks really traded places.
    assert torch.equal(fabric.storages[A].keys[:, :, 1], before[C][0][:, :, 3])
    assert torch.equal(fabric.storages[C].keys[:, :, 3], before[A][0][:, :, 1])
    assert torch.equal(fabric.storages[B].values[:, :, 0], before[B][1][:, :, 5])
    assert not torch.equal(fabric.storages[B].keys[:, :, 0], before[B][0][:, :, 0])
    # A block is K and V of every layer: 2 * LAYERS * HKV * BS * D floats = 1024 bytes.
    assert fabric.stats.blocks_moved == 5
    assert fabric.stats.bytes_sent == 5 * 2 * LAYERS * HKV * BS * D * FLOAT == 5 * 1024
    assert fabric.stats.remote_attention_calls == 0


def test_move_blocks_of_nothing_changes_nothing():
    fabric = fabric_of(2)
    fill(fabric)
    before = [s.keys.clone() for s in fabric.storages.values()]
    fabric.move_blocks([])
    assert all(torch.equal(s.keys, b) for s, b in zip(fabric.storages.values(), before))
    assert (fabric.stats.blocks_moved, fabric.stats.bytes_sent) == (0, 0)
