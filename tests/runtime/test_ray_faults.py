"""A Ray actor that crashes at a point of a step (runtime/faults.py): in the middle of a layer's
exchange (its peer waits on it inside torch.distributed), while the rebalancer's recall copies
blocks out of it, and after it sampled. The engine drops it, the survivor regroups, and every
request ends with the tokens of the in-process executor, with the integrity check after every
step and the survivor's pool full at the end.

Each case starts its own two actors (the crash takes one): seconds each, so only these three.
"""

from __future__ import annotations

import pytest

from infinillm import LLM, SamplingParams
from infinillm.runtime.faults import FaultPlan
from infinillm.types import InstanceId

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
# As tests/engine/test_faults.py: request "3" borrows from instance 1, and is recalled home.
SETTINGS = dict(block_size=4, kv_blocks_per_instance=14, num_instances=2,
                max_num_batched_tokens=16)
LENGTHS = (44, 30, 20, 25)


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[list[int]]:
    llm = LLM(tiny_llama, **SETTINGS)
    return [o.outputs[0].token_ids
            for o in llm.generate(prompts(2, LENGTHS), GREEDY, use_tqdm=False)]


# (point, hit) on instance 1, the lender: hit 5 of "exchange.during" is the second step with
# remote blocks, at its middle layer; the first "move" is the recall of request "3"'s blocks.
POINTS = [("exchange.during", 5), ("move", 1), ("sample", 7)]


@pytest.mark.parametrize("point, hit", POINTS, ids=[p for p, _ in POINTS])
def test_a_crashed_actor_loses_no_token(tiny_llama, expected, point, hit):
    with LLM(tiny_llama, executor="ray", dist_timeout_s=5.0, **SETTINGS) as llm:
        engine = llm.engine
        engine.executor.set_fault(FaultPlan(point, InstanceId(1), hit, exit_process=True))
        ids = [engine.add_request(p, GREEDY) for p in prompts(2, LENGTHS)]
        done = {}
        for _ in range(500):
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
            engine.check_integrity()
        assert [done[i].outputs[0].token_ids for i in ids] == expected
        assert [i.instance_id for i in engine.instances] == [0]
        assert list(engine.executor.actors) == [0]  # the crash was seen, not a planned stop
        assert engine.num_free_blocks() == [14]
        assert engine.cluster_stats()["debts"] == []
