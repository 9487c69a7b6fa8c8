"""The engine against Hugging Face transformers' own model (tiny random Llama, Qwen2, Qwen3).

Every logits row the engine samples from (prefill and each decode step) must match
transformers' forward over the same tokens to 1e-4 relative in fp32, and greedy tokens must be
identical, whatever the block size, batch mix, chunking and preemption.
"""

from __future__ import annotations

import pytest
import torch

from infinillm import LLM, SamplingParams
from infinillm.runtime.traffic import order_chunks

NEW_TOKENS = 10


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by full forward passes (no cache): tokens and their logits rows."""
    ids = list(prompt)
    rows = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        rows.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], torch.stack(rows)


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return model.eval()


def prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 40, 64, 9, 33][:n]
    return [torch.randint(0, 512, (length,), generator=gen).tolist() for length in lengths]


def record_logits(llm: LLM) -> dict[str, list[torch.Tensor]]:
    """Wrap the worker's forward to keep every sampled logits row, by request id."""
    worker = llm.engine.executor.workers[0]
    forward = worker.model.forward
    seen: dict[str, list[torch.Tensor]] = {}
    execute = worker.execute

    def spy_execute(plan):
        order = [c for c in order_chunks(worker.instance_id, plan.chunks)[0] if c.sample]

        def spy_forward(*args):
            logits = forward(*args)
            for c, row in zip(order, logits):
                seen.setdefault(c.request_id, []).append(row.clone())
            return logits

        worker.model.forward = spy_forward
        try:
            return execute(plan)
        finally:
            worker.model.forward = forward

    worker.execute = spy_execute
    return seen


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_logits_and_greedy_tokens_match_transformers(tiny_model, hf_model, block_size):
    llm = LLM(tiny_model, block_size=block_size, max_num_batched_tokens=48)
    seen = record_logits(llm)
    batch = prompts(6, seed=block_size)
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        ref_tokens, ref_logits = hf_greedy(hf_model, prompt, NEW_TOKENS)
        assert out.outputs[0].token_ids == ref_tokens
        ours = torch.stack(seen[out.request_id])
        assert ours.shape == ref_logits.shape
        rel = (ours - ref_logits).abs().max() / ref_logits.abs().max()
        assert rel < 1e-4, f"relative logits error {rel:.2e}"
    llm.engine.check_integrity()
    assert llm.engine.num_free_blocks() == [llm.engine.num_blocks_per_instance]


def test_preemption_and_tiny_pool_keep_tokens(tiny_model, hf_model):
    """A pool too small for the batch forces preemption by recompute; tokens stay exact."""
    batch = prompts(3, seed=11)  # 3, 17 and 40 tokens
    # requests are admitted when their prompts fit; growing by 40 tokens each (to 43, 57 and
    # 80: each fits alone), the ones running outgrow the 10 blocks of 8 and preempt
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    llm = LLM(tiny_model, block_size=8, kv_blocks_per_instance=10, max_num_batched_tokens=32)
    outs = llm.generate(batch, params, use_tqdm=False)
    assert sum(i.scheduler.num_preemptions for i in llm.engine.instances) > 0
    for prompt, out in zip(batch, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, 40)[0]
    llm.engine.check_integrity()
    assert llm.engine.num_free_blocks() == [10]


def test_requests_arriving_mid_flight(tiny_model, hf_model):
    """Continuous batching: requests join while others decode; all stay exact."""
    llm = LLM(tiny_model, block_size=7, max_num_batched_tokens=20)
    engine = llm.engine
    batch = prompts(5, seed=3)
    ids, done = [], {}
    for prompt in batch:
        ids.append(engine.add_request(prompt, GREEDY))
        for out in engine.step():  # one step between arrivals
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
    for rid, prompt in zip(ids, batch):
        assert done[rid].outputs[0].token_ids == hf_greedy(hf_model, prompt, NEW_TOKENS)[0]
    assert engine.num_free_blocks() == [engine.num_blocks_per_instance]


def test_bfloat16_logits_close_to_float32_reference(tiny_llama):
    """bfloat16 weights and KV: logits within bf16 rounding of transformers' fp32 forward."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    llm = LLM(tiny_llama, dtype="bfloat16", block_size=7)
    seen = record_logits(llm)
    batch = prompts(3, seed=5)
    outs = llm.generate(batch, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(batch, outs):
        ids = prompt + out.outputs[0].token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
        ours = torch.stack(seen[out.request_id])
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < 5e-2, f"relative logits error {rel:.2e}"
    llm.engine.check_integrity()


def test_long_prompt_into_a_busy_pool_waits_instead_of_recomputing(tiny_llama):
    """A long prompt admitted chunk by chunk while short requests decode runs out of blocks
    halfway: it goes on with what there is, or waits for a decode to finish, and never throws
    its computed prefix away; every token stays exact."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(5)
    short = [torch.randint(0, 512, (6,), generator=gen).tolist() for _ in range(4)]
    long = torch.randint(0, 512, (90,), generator=gen).tolist()
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # 32 blocks of 4 = 128 tokens: the short ones grow to 30 tokens each, the long one to 114
    llm = LLM(tiny_llama, block_size=4, kv_blocks_per_instance=32, max_num_batched_tokens=16)
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in short]
    engine.step()
    long_id = engine.add_request(long, params)
    long_request = engine.streams[long_id].request
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
    assert long_request.num_preemptions == 0
    for rid, prompt in zip([*ids, long_id], [*short, long]):
        assert done[rid] == hf_greedy(hf, prompt, 24)[0]
    assert engine.num_free_blocks() == [32]
