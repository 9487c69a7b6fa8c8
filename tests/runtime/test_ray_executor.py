"""Instances as Ray actors with a torch.distributed (gloo) data plane, against inproc.

Ray start-up costs seconds, so one module-scoped cluster serves both tests.
"""

from __future__ import annotations

import pytest
import torch

from infinillm import LLM, SamplingParams

# A Ray cluster and its actor processes: tens of seconds to start on 2 cores.
pytestmark = [pytest.mark.ray, pytest.mark.slow]

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SETTINGS = dict(block_size=4, kv_blocks_per_instance=14, num_instances=2,
                max_num_batched_tokens=16)


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def ray_llm(tiny_llama):
    llm = LLM(tiny_llama, executor="ray", dist_timeout_s=5.0, **SETTINGS)
    yield llm
    llm.shutdown()


def test_ray_actors_match_inproc_with_borrowing(tiny_llama, ray_llm):
    batch = prompts(1, (70, 30, 9, 25))  # 70 tokens: more than one pool of 14 blocks of 4
    expected = [o.outputs[0].token_ids for o in
                LLM(tiny_llama, **SETTINGS).generate(batch, GREEDY, use_tqdm=False)]
    outs = ray_llm.generate(batch, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = ray_llm.cluster_stats()
    assert stats["remote_attention_calls"] > 0  # blocks really were borrowed across processes
    ray_llm.engine.check_integrity()


def test_killed_actor_loses_no_request(tiny_llama, ray_llm):
    import ray

    # each request fits one pool (the survivor's), but together they make instances borrow
    batch = prompts(2, (44, 30, 20, 25))
    expected = [o.outputs[0].token_ids for o in
                LLM(tiny_llama, **SETTINGS).generate(batch, GREEDY, use_tqdm=False)]
    engine = ray_llm.engine
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    for _ in range(6):  # mid-generation: prompts prefilled, some tokens out, loans taken
        for out in engine.step():
            done[out.request_id] = out
    assert any(i.rmanager.num_borrowed_blocks() for i in engine.instances)
    ray.kill(engine.executor.actors[1])
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
        engine.check_integrity()
    assert [done[i].outputs[0].token_ids for i in ids] == expected
    assert [i.instance_id for i in engine.instances] == [0]
    assert engine.num_free_blocks() == [14]
