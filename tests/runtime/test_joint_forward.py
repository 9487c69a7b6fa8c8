"""In-process instances run one forward per step (runtime/worker.py `forward_together`).

With requests borrowing blocks across 2 and 3 instances, the joint forward must give the greedy
tokens of transformers' own model (full forwards, no cache) and, row for row, the logits of every
instance running its own forward; partial steps (only some instances) must keep that too.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from infinillm import LLM, SamplingParams
from infinillm.runtime import worker as worker_module

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_greedy(tiny_llama):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.eval()

    @functools.cache
    def run(prompt: tuple[int, ...], n: int) -> list[int]:
        ids = list(prompt)
        for _ in range(n):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]

    return run


def spy(llm: LLM, monkeypatch) -> tuple[dict, list[int]]:
    """Record every logits row each worker samples from, by request, and the number of
    instances in each joint forward."""
    rows: dict[str, list[torch.Tensor]] = {}
    joint: list[int] = []
    for w in llm.engine.executor.workers.values():
        finish = w.finish

        def spy_finish(step, logits, finish=finish):
            for c, row in zip(step.sampled, logits):
                rows.setdefault(c.request_id, []).append(row.clone())
            return finish(step, logits)

        w.finish = spy_finish
    forward = worker_module.forward_together

    def spy_forward(model, steps):
        joint.append(len(steps))
        return forward(model, steps)

    monkeypatch.setattr("infinillm.runtime.executor.forward_together", spy_forward)
    return rows, joint


def run_checked(llm: LLM, batch: list[list[int]], partial: bool = False) -> list[list[int]]:
    """Step to the end, checking integrity after each step; with `partial`, every other step
    runs only the first two instances."""
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    for n in range(2000):
        if not engine.has_unfinished_requests():
            break
        some = [i.instance_id for i in engine.instances[:2]] if partial and n % 2 else None
        for out in engine.step(some):
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
    assert not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == [engine.num_blocks_per_instance] * len(engine.instances)
    return [done[i] for i in ids]


@pytest.mark.parametrize("num_instances, num_blocks", [(2, 12), (3, 8)])
def test_joint_forward_with_borrowing_matches_transformers_and_separate_forwards(
        tiny_llama, hf_greedy, monkeypatch, num_instances, num_blocks):
    batch = prompts([30, 7, 45, 19, 60, 3], seed=5)
    settings = dict(block_size=4, kv_blocks_per_instance=num_blocks,
                    num_instances=num_instances, max_num_batched_tokens=16)
    joint_llm = LLM(tiny_llama, **settings)
    joint_rows, joint = spy(joint_llm, monkeypatch)
    tokens = run_checked(joint_llm, batch)
    assert tokens == [hf_greedy(tuple(p), GREEDY.max_tokens) for p in batch]
    assert max(joint) == num_instances  # every instance's rows in one forward
    assert joint_llm.cluster_stats()["remote_attention_calls"] > 0  # requests borrowed

    separate_llm = LLM(tiny_llama, **settings)
    separate_llm.engine.executor.joint_forward = False
    separate_rows, separate = spy(separate_llm, monkeypatch)
    assert run_checked(separate_llm, batch) == tokens
    assert separate == []
    assert joint_rows.keys() == separate_rows.keys()
    for rid, rows in joint_rows.items():
        assert len(rows) == len(separate_rows[rid])
        for a, b in zip(rows, separate_rows[rid]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_partial_steps_of_a_joint_forward_stay_exact(tiny_llama, hf_greedy, monkeypatch):
    batch = prompts([30, 7, 45, 19, 60, 3], seed=5)
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=8, num_instances=3,
              max_num_batched_tokens=16)
    _, joint = spy(llm, monkeypatch)
    expected = [hf_greedy(tuple(p), GREEDY.max_tokens) for p in batch]
    assert run_checked(llm, batch, partial=True) == expected
    assert 2 in joint and 3 in joint
    assert llm.cluster_stats()["remote_attention_calls"] > 0


def test_instances_share_the_step_seconds(tiny_llama):
    """Each instance of a joint step gets seconds; together they are the step's wall time."""
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=64, num_instances=2)
    engine, executor = llm.engine, llm.engine.executor
    execute, walls = executor.execute, []

    def timed(plans):
        started = time.perf_counter()
        result = execute(plans)
        walls.append((time.perf_counter() - started, sum(result.seconds.values())))
        return result

    executor.execute = timed
    for p in prompts([40, 8, 8], seed=1):
        engine.add_request(p, GREEDY)
    engine.step()
    assert all(s.num_tokens and s.seconds > 0 for s in engine.last_step.instances)
    assert len(engine.last_step.instances) == 2
    wall, total = walls[0]
    assert 0.8 * wall < total <= wall
