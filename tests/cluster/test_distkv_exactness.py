"""DistKV end to end: with blocks lent across instances, tokens equal one instance holding all.

Pools are made small so that requests borrow, recall brings blocks home and, in the tightest
case, the cluster preempts. The reference is one instance with a pool big enough for
everything; that instance is itself checked against transformers in tests/engine.
"""

from __future__ import annotations

import pytest
import torch

from infinillm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=512)

    def run(batch):
        return [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]

    return run


def run_checked(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    """Generate step by step, checking every invariant after each step."""
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    for _ in range(2000):  # far more steps than the work needs: no livelock
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
    assert not engine.has_unfinished_requests(), "requests did not finish in 2000 steps"
    assert engine.num_free_blocks() == [engine.num_blocks_per_instance] * len(engine.instances)
    assert engine.cluster_stats()["debts"] == []
    assert all(i.rmanager.num_lent_blocks == 0 for i in engine.instances)
    return [done[i] for i in ids]


@pytest.mark.parametrize("num_instances, num_blocks", [(2, 12), (3, 8), (4, 6)])
def test_borrowing_keeps_tokens_exact(tiny_llama, reference, num_instances, num_blocks):
    batch = prompts([30, 7, 45, 19, 60, 3], seed=num_instances)
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=num_blocks,
              num_instances=num_instances, max_num_batched_tokens=16)
    assert run_checked(llm, batch) == reference(batch)
    stats = llm.cluster_stats()
    assert stats["remote_attention_calls"] > 0 and stats["remote_bytes"] > 0


def test_recall_and_preemption_keep_tokens_exact(tiny_llama, reference):
    """A tight cluster: loans, recall (swaps and bring-home) and preemption all happen."""
    batch = prompts([50, 40, 33, 21, 9, 61, 14, 5], seed=9)
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=14, num_instances=2,
              max_num_batched_tokens=12)
    assert run_checked(llm, batch) == reference(batch)
    stats = llm.cluster_stats()
    assert stats["migrations"] > 0
    assert stats["preemptions"] + stats["standstills"] > 0


def test_request_three_pools_long_completes_on_four_instances(tiny_llama, reference):
    block_size, num_blocks = 4, 10  # one pool holds 40 tokens
    prompt = prompts([3 * block_size * num_blocks - 12], seed=4)  # 108 prompt + 12 new = 3 pools
    llm = LLM(tiny_llama, block_size=block_size, kv_blocks_per_instance=num_blocks,
              num_instances=4, max_num_batched_tokens=32)
    assert run_checked(llm, prompt) == reference(prompt)
    # without lending the same request is refused at admission, with a clear message
    alone = LLM(tiny_llama, block_size=block_size, kv_blocks_per_instance=num_blocks,
                num_instances=4, lending=False)
    with pytest.raises(ValueError, match="needs 28 KV blocks; an instance holds 10"):
        alone.generate(prompt, GREEDY, use_tqdm=False)


def test_many_prompts_longer_than_a_pool_at_once_all_complete(tiny_llama, reference):
    """Five prompts of 1.9-2.8 pools arriving together on 4 instances: together they need more
    than the cluster. Admitted on their first chunk alone, they filled every pool half-prefilled
    and waited on each other for ever (preempted and readmitted in turn); they must all
    complete, exactly."""
    batch = prompts([150, 180, 120, 170, 140, 9, 14], seed=21)  # a pool holds 64 tokens
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=16, num_instances=4,
              max_num_batched_tokens=32)
    assert run_checked(llm, batch) == reference(batch)


def test_request_beyond_the_cluster_is_refused(tiny_llama):
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=10, num_instances=2,
              max_lent_fraction=0.5)
    # 10 own + 5 lendable = 15 blocks = 60 tokens; a 60-token prompt needs 16 blocks
    with pytest.raises(ValueError, match="needs 16 KV blocks; the cluster can give one request 15"):
        llm.generate([[1] * 60], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate([[1] * 50], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_lending_off_keeps_every_block_home(tiny_llama, reference):
    batch = prompts([30, 7, 45, 19], seed=2)
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=20, num_instances=2,
              lending=False, max_num_batched_tokens=16)
    assert run_checked(llm, batch) == reference(batch)
    stats = llm.cluster_stats()
    assert stats["remote_attention_calls"] == 0 and stats["debts"] == []
    assert all(i["lent_blocks"] == 0 and i["borrowed_blocks"] == 0 for i in stats["instances"])


def test_random_migrations_between_steps_keep_tokens_exact(tiny_llama, reference):
    """Blocks moved between instances mid-generation (copy, then switch the table) are read
    from their new home with the same contents."""
    batch = prompts([37, 22, 51], seed=13)
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=40, num_instances=3,
              max_num_batched_tokens=16)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in batch]
    gen = torch.Generator().manual_seed(0)
    done, moved = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        for inst in engine.instances:
            for rid in inst.rmanager.request_ids():
                num_blocks = len(inst.rmanager.block_locations(rid))
                index = int(torch.randint(0, num_blocks, (1,), generator=gen))
                dst = int(torch.randint(0, 3, (1,), generator=gen))
                moved += engine.migrate_block(rid, index, dst)
        engine.check_integrity()
    assert moved > 20
    assert [done[i] for i in ids] == reference(batch)



def test_proactive_placement_keeps_tokens_exact(tiny_llama, reference):
    """Under proactive placement KV of long requests moves off instances whose queue cannot
    start; tokens stay those of one instance holding everything."""
    batch = prompts([50, 10, 40, 12, 8, 44, 30, 6, 9], seed=7)
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=20, num_instances=3,
              max_num_batched_tokens=16, placement="proactive")
    assert run_checked(llm, batch) == reference(batch)
    placement = llm.engine.rebalancer.placement
    assert placement.num_moves > 0
    stats = llm.cluster_stats()
    assert stats["placement"] == "proactive" and stats["placement_moves"] == placement.num_moves
