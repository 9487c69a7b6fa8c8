"""Prefix caching end to end: hits give Hugging Face's greedy tokens, on one instance and with
the prefix read in place on another instance; preemption, abort, eviction and instance loss
release only their own references; every pool is full again (free plus cached) at the end.
"""

from __future__ import annotations

import pytest
import torch

from infinillm import LLM, SamplingParams
from infinillm.kvcache.prefix import block_keys
from infinillm.runtime.faults import FaultPlan
from infinillm.types import InstanceId

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def tokens(seed: int, *lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf(tiny_llama):
    """Greedy continuation by transformers, full forward passes (the independent reference)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.eval()
    memo: dict[tuple[int, ...], list[int]] = {}

    def greedy(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in memo:
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(GREEDY.max_tokens):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            memo[tuple(prompt)] = ids[len(prompt):]
        return memo[tuple(prompt)]

    return greedy


def run(llm: LLM, batch: list[list[int]], during=None, max_steps: int = 1000) -> list:
    """Every request to its end, the integrity checked after each step; outputs in order."""
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
        if during is not None:
            during(engine, ids)
    assert not engine.has_unfinished_requests()
    return [done[i] for i in ids]


def assert_full(llm: LLM) -> None:
    """All requests ended: every pool is free or cached-unreferenced, nobody owes anything."""
    engine = llm.engine
    assert engine.num_free_blocks() == [engine.num_blocks_per_instance] * len(engine.instances)
    stats = engine.cluster_stats()
    assert stats["debts"] == []
    assert all(i["cached_blocks"] == i["evictable_blocks"] for i in stats["instances"])


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_hits_on_one_instance_give_hf_tokens(tiny_llama, hf, block_size):
    prefix, a, b = tokens(block_size, 37, 6, 3)
    llm = LLM(tiny_llama, block_size=block_size, kv_blocks_per_instance=200)
    batch = [prefix + a, prefix + b, prefix]
    (first,) = run(llm, [prefix])
    outs = run(llm, batch)
    assert first.num_cached_tokens == 0
    for prompt, out in zip([prefix, *batch], [first, *outs]):
        assert out.outputs[0].token_ids == hf(prompt)
    shared = len(prefix) // block_size * block_size  # full blocks of the prefix
    whole = (len(prefix) - 1) // block_size * block_size  # the last token is always computed
    assert [o.num_cached_tokens for o in outs] == [shared, shared, whole]
    stats = llm.cluster_stats()
    assert stats["prefix_cache_hits"] == 2 * shared + whole
    assert stats["prefix_cache_queries"] == len(prefix) + sum(map(len, batch))
    assert_full(llm)
    off = LLM(tiny_llama, block_size=block_size, kv_blocks_per_instance=200,
              enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in run(off, [prefix, *batch])] == [
        o.outputs[0].token_ids for o in [first, *outs]]
    assert off.cluster_stats()["instances"][0]["cached_blocks"] == 0


@pytest.mark.parametrize("num_instances, block_size", [(2, 5), (3, 16), (2, 1)])
def test_a_prefix_on_another_instance_is_read_in_place(tiny_llama, hf, num_instances,
                                                       block_size):
    """One request per instance (max_num_seqs=1): the prefix cached on instance 0 is read by
    the requests of the others where it lives: remote micro-attention, no block copied."""
    prefix, *suffixes = tokens(7, 40, *([4] * num_instances))
    llm = LLM(tiny_llama, block_size=block_size, kv_blocks_per_instance=120,
              num_instances=num_instances, max_num_seqs=1)
    (first,) = run(llm, [prefix])
    num_prefix_blocks = len(prefix) // block_size
    seen_remote = set()

    def look(engine, ids):
        for rid in ids:
            where = engine.block_locations(rid)
            if where and engine.streams[rid].request.instance_id != 0:
                assert all(h == 0 for h, _ in where[:num_prefix_blocks])
                seen_remote.add(rid)

    outs = run(llm, [prefix + s for s in suffixes], during=look)
    assert len(seen_remote) == num_instances - 1
    for s, out in zip(suffixes, outs):
        assert out.outputs[0].token_ids == hf(prefix + s)
        assert out.num_cached_tokens == num_prefix_blocks * block_size
    stats = llm.cluster_stats()
    assert stats["remote_attention_calls"] > 0 and stats["migrations"] == 0
    # the prefix's blocks exist once, on instance 0: nothing recomputed them elsewhere
    keys = llm.engine.streams  # all ended
    assert keys == {}
    prefix_keys = block_keys(prefix, block_size, [])
    holders = [[i.instance_id for i in llm.engine.instances
                if i.rmanager._pool.lookup_quiet(k) is not None] for k in prefix_keys]
    assert holders == [[0]] * num_prefix_blocks
    assert_full(llm)


def test_preemption_and_abort_release_only_their_own_references(tiny_llama, hf):
    """Requests sharing a cached prefix: one is preempted (recomputed, hitting the cache
    again), one aborted, mid-run; the others keep reading the shared blocks."""
    prefix, *suffixes = tokens(3, 24, 9, 14, 5)
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=40, max_num_batched_tokens=16)
    run(llm, [prefix])
    acted = []

    def act(engine, ids):
        if acted or engine.num_steps < 4:
            return
        preempted, aborted = (engine.streams[r].request for r in ids[:2])
        assert all(len(engine.block_locations(r)) for r in ids[:2])  # both hold shared blocks
        engine.instances[0].scheduler.preempt(preempted)
        engine.abort_request(aborted.request_id)
        acted.extend([preempted, aborted])

    batch = [prefix + s for s in suffixes]
    outs = run(llm, batch[:1])  # a hit while nothing else runs
    assert outs[0].outputs[0].token_ids == hf(batch[0])
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
        act(engine, ids)
    assert acted and acted[0].num_preemptions == 1
    assert ids[1] not in done
    for rid, prompt in zip(ids, batch):
        if rid != ids[1]:
            assert done[rid].outputs[0].token_ids == hf(prompt)
            assert done[rid].num_cached_tokens >= 24  # 32 for batch[0], cached whole
    assert_full(llm)


def test_cached_blocks_are_evicted_when_memory_is_needed(tiny_llama, hf):
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=16)
    first, second = tokens(11, 40, 44)
    run(llm, [first])  # its 11 full blocks stay cached in a pool of 16
    (out,) = run(llm, [second])  # needs 13 blocks: 5 free, the rest evicted
    assert out.outputs[0].token_ids == hf(second) and out.num_cached_tokens == 0
    pool = llm.engine.instances[0].rmanager._pool
    assert pool.num_evictions > 0
    assert_full(llm)


def test_losing_the_instance_that_holds_a_prefix_recomputes_its_readers(tiny_llama, hf):
    prefix, a, b = tokens(5, 30, 6, 4)
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=60, num_instances=2,
              max_num_seqs=1)
    run(llm, [prefix])
    plan = FaultPlan("sample", InstanceId(0), 3)  # mid-generation, instance 1 reading 0's prefix
    llm.engine.executor.set_fault(plan)
    outs = run(llm, [prefix + a, prefix + b])
    assert plan.fired
    assert [o.outputs[0].token_ids for o in outs] == [hf(prefix + a), hf(prefix + b)]
    assert [i.instance_id for i in llm.engine.instances] == [1]
    assert_full(llm)


def test_the_setting_and_its_flags():
    import argparse

    from infinillm.cli import add_config_args, config_kwargs
    from infinillm.config import Config

    parser = argparse.ArgumentParser()
    add_config_args(parser)
    for argv, on in (([], True), (["--no-prefix-caching"], False),
                     (["--no-enable-prefix-caching"], False)):
        kwargs = config_kwargs(parser.parse_args(argv))
        assert Config.from_kwargs(**kwargs).cache.enable_prefix_caching is on
    with pytest.raises((TypeError, ValueError)):
        Config.from_kwargs(enable_prefix_caching="yes")
