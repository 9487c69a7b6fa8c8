"""traffic.py: a step's row order, each holder's prefix, and the remote work an owner sends.

Every expected value is derived by hand in the comments (block size 4 throughout; a flat slot
is block * 4 + position % 4), so a change in the rules shows up as an exact mismatch.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from infinillm.runtime.traffic import (
    MAX_PADDED_DECODE_LEN,
    Prefix,
    RemoteItem,
    RemoteWork,
    order_chunks,
    prefix_by_holder,
    remote_work,
    tokens_by_holder,
)
from infinillm.types import BlockId, InstanceId, RequestId, ScheduledChunk

BS = 4
ME = InstanceId(0)


def chunk(name: str, num_tokens: int, start_pos: int,
          blocks: list[tuple[int, int]]) -> ScheduledChunk:
    return ScheduledChunk(RequestId(name), list(range(num_tokens)), start_pos,
                          [(InstanceId(i), BlockId(b)) for i, b in blocks], sample=True)


def names(chunks: list[ScheduledChunk]) -> list[str]:
    return [c.request_id for c in chunks]


def test_order_puts_short_local_decodes_first_in_their_given_order():
    chunks = [
        chunk("prefill", 3, 0, [(0, 5)]),  # 3 tokens: not a decode
        chunk("ctx10", 1, 9, [(0, 1), (0, 2), (0, 3)]),  # local decode, 10 keys
        chunk("ctx3", 1, 2, [(0, 7)]),  # local decode, 3 keys
        chunk("borrowed", 1, 5, [(0, 4), (1, 6)]),  # a block on instance 1: never padded
        chunk("ctx101", 1, 100, [(0, b) for b in range(26)]),  # local decode, 101 keys
    ]
    # Eligible, shortest first: ctx3, ctx10, ctx101. The rule admits the (count+1)-th decode of
    # context n while (count+1) * n <= 2 * (keys so far + n):
    #   ctx3:   1 * 3   <= 2 * (0 + 3)    = 6     -> in, keys 3
    #   ctx10:  2 * 10  <= 2 * (3 + 10)   = 26    -> in, keys 13
    #   ctx101: 3 * 101 =  303 > 2 * (13 + 101) = 228 -> out (it would triple the padding)
    # The padded ones keep the caller's order (ctx10 before ctx3), then the rest in order.
    ordered, num_padded = order_chunks(ME, chunks)
    assert num_padded == 2
    assert names(ordered) == ["ctx10", "ctx3", "prefill", "borrowed", "ctx101"]
    assert names(chunks) == ["prefill", "ctx10", "ctx3", "borrowed", "ctx101"]  # not reordered


def test_order_excludes_contexts_at_the_padded_limit():
    at_limit = chunk("at_limit", 1, MAX_PADDED_DECODE_LEN,
                     [(0, 0)] * (MAX_PADDED_DECODE_LEN // BS + 1))
    below = chunk("below", 1, MAX_PADDED_DECODE_LEN - 1, [(0, 0)] * (MAX_PADDED_DECODE_LEN // BS))
    ordered, num_padded = order_chunks(ME, [at_limit, below])
    assert (names(ordered), num_padded) == (["below", "at_limit"], 1)


def test_order_keeps_the_list_when_every_chunk_is_padded():
    chunks = [chunk("a", 1, 6, [(0, 0), (0, 1)]), chunk("b", 1, 4, [(0, 2), (0, 3)])]
    # b (5 keys): 1 * 5 <= 10; a (7 keys): 2 * 7 = 14 <= 2 * (5 + 7) = 24: both padded.
    ordered, num_padded = order_chunks(ME, chunks)
    assert ordered is chunks and num_padded == 2
    assert order_chunks(ME, []) == ([], 0)


def test_order_judges_locality_from_the_callers_side():
    # The same decode is local to instance 1 and remote to instance 0.
    c = chunk("x", 1, 5, [(1, 0), (1, 1)])
    assert order_chunks(InstanceId(1), [c])[1] == 1
    assert order_chunks(ME, [c])[1] == 0


def test_prefix_by_holder_splits_full_blocks_and_the_tail():
    # start_pos 10 = 2 full blocks + 2 tokens: index 0 -> (0, 3) 4 tokens, index 1 -> (1, 8)
    # 4 tokens, index 2 -> (0, 5) 2 tokens; index 3 (positions 12..15) is not in the prefix.
    c = chunk("r", 3, 10, [(0, 3), (1, 8), (0, 5), (1, 9)])
    got = prefix_by_holder(c, BS)
    assert got == {ME: Prefix([3, 5], 6), InstanceId(1): Prefix([8], 4)}
    assert list(got) == [0, 1]  # holders in order of their first block


def test_prefix_by_holder_at_block_boundaries_and_empty():
    # start_pos 8: exactly blocks 0 and 1, the chunk's own block 2 is not in the prefix.
    c = chunk("r", 1, 8, [(2, 0), (2, 6), (1, 1)])
    assert prefix_by_holder(c, BS) == {InstanceId(2): Prefix([0, 6], 8)}
    assert prefix_by_holder(chunk("new", 5, 0, [(1, 4), (1, 2)]), BS) == {}


def test_remote_work_rows_slots_and_items():
    padded = chunk("p", 1, 5, [(0, 2), (0, 6)])  # row 0; local only: no remote work
    prefill = chunk("q", 3, 6, [(0, 1), (1, 4), (2, 7)])  # rows 1..3
    decode = chunk("d", 1, 9, [(1, 0), (0, 3), (2, 5)])  # row 4
    work = remote_work(ME, [padded, prefill, decode], num_padded=1, block_size=BS)
    # q: pos 6, 7 -> index 1 (1, 4): rows 1, 2 at slots 4*4+2 = 18, 19;
    #    pos 8 -> index 2 (2, 7): row 3 at slot 28.
    #    prefix [0, 6): index 0 (0, 1) 4 tokens (local), index 1 (1, 4) 2 tokens -> holder 1.
    # d: pos 9 -> index 2 (2, 5): row 4 at slot 5*4+1 = 21.
    #    prefix [0, 9): (1, 0) 4 tokens, (0, 3) 4 tokens (local), (2, 5) 1 token (position 8).
    assert work == {
        InstanceId(1): RemoteWork(
            write_rows=[1, 2], write_slots=[18, 19],
            items=[RemoteItem(1, 3, Prefix([4], 2)), RemoteItem(4, 1, Prefix([0], 4))]),
        InstanceId(2): RemoteWork(
            write_rows=[3, 4], write_slots=[28, 21],
            items=[RemoteItem(4, 1, Prefix([5], 1))]),
    }
    assert list(work) == [1, 2]
    assert [w.num_query_rows for w in work.values()] == [4, 1]


def test_remote_work_write_only_holder_and_all_local_step():
    # The new token (position 4) lands in a borrowed block whose holder stores nothing before
    # it: instance 1 gets a write (row 0, slot 3*4+0 = 12) and no micro-attention.
    c = chunk("w", 1, 4, [(0, 0), (1, 3)])
    assert remote_work(ME, [c], 0, BS) == {InstanceId(1): RemoteWork([0], [12], [])}
    local = [chunk("a", 2, 3, [(0, 0), (0, 1)]), chunk("b", 1, 0, [(0, 2)])]
    assert remote_work(ME, local, 0, BS) == {}


def test_remote_work_follows_the_order_of_order_chunks():
    chunks = [chunk("q", 2, 4, [(1, 9), (0, 2)]),  # prefix (1, 9) 4 tokens; writes local
              chunk("d", 1, 2, [(0, 5)])]  # local decode: padded, moves to row 0
    ordered, num_padded = order_chunks(ME, chunks)
    assert (names(ordered), num_padded) == (["d", "q"], 1)
    # q now starts at row 1; its two rows query holder 1 over block 9.
    assert remote_work(ME, ordered, num_padded, BS) == {
        InstanceId(1): RemoteWork([], [], [RemoteItem(1, 2, Prefix([9], 4))])}


def test_a_chunk_built_without_holders_counts_them_from_its_blocks():
    c = chunk("r", 1, 9, [(0, 3), (1, 8), (0, 5)])
    assert c.holders == {0: 2, 1: 1}
    given_counts = ScheduledChunk(RequestId("s"), [1], 0, [(ME, BlockId(0))], True,
                                  holders={ME: 1})
    assert given_counts.holders == {ME: 1}


def test_tokens_by_holder_counts_full_blocks_and_the_last_ones_remainder():
    # 3 tokens at 10..12: positions 0..12 (13) over blocks 0..3; block 3 holds only 12.
    c = chunk("r", 3, 10, [(0, 3), (1, 8), (0, 5), (1, 9)])
    assert tokens_by_holder(c, BS) == {ME: 8, InstanceId(1): 5}
    # a table longer than the context: blocks 1 and 2 hold nothing yet (position 0 only)
    c = chunk("new", 1, 0, [(2, 0), (1, 4), (2, 6)])
    assert tokens_by_holder(c, BS) == {InstanceId(2): 1}
    # the context ends on a block boundary: the last block is full
    assert tokens_by_holder(chunk("d", 1, 7, [(1, 1), (0, 2)]), BS) == {ME: 4, InstanceId(1): 4}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_tokens_by_holder_equals_a_count_over_every_position(data):
    block_size = data.draw(st.integers(1, 8), label="block_size")
    end = data.draw(st.integers(1, 80), label="context")  # start_pos + len(token_ids)
    num_new = data.draw(st.integers(1, end), label="num_new")
    num_blocks = -(-end // block_size) + data.draw(st.integers(0, 3), label="extra blocks")
    holders = data.draw(st.lists(st.integers(0, 4), min_size=num_blocks, max_size=num_blocks),
                        label="holder of each block")
    c = chunk("r", num_new, end - num_new, [(h, b) for b, h in enumerate(holders)])
    expected: dict[InstanceId, int] = {}
    for pos in range(end):
        holder = c.blocks[pos // block_size][0]
        expected[holder] = expected.get(holder, 0) + 1
    assert tokens_by_holder(c, block_size) == expected
