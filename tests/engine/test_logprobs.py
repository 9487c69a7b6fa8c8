"""Logprobs against Hugging Face transformers' own model (tiny random Llama, float32).

Prompt and sampled-token logprobs must equal transformers' log-softmax within 1e-4, with their
top-n lists, whatever the chunking, lending and preemption; prompt logprobs are computed once
per position, and only requests that ask for them pay for the LM head over their prompt.
"""

from __future__ import annotations

import pytest
import torch

from infinillm import LLM, SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama,
                                                             dtype=torch.float32).eval()


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log-softmax of transformers' logits at every position (float32)."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], dim=-1)


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


def check_top(top: list[tuple[int, float]], row: torch.Tensor, n: int) -> None:
    assert len(top) == n
    values, indices = row.topk(n)
    assert [t for t, _ in top] == indices.tolist()
    assert all(abs(lp - v) < TOL for (_, lp), v in zip(top, values.tolist()))


def check_against_hf(hf_model, prompt: list[int], out, prompt_top: int, output_top: int) -> None:
    tokens = out.outputs[0].token_ids
    ref = hf_logprobs(hf_model, prompt + tokens)
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for pos in range(1, len(prompt)):
        assert plp[pos].token_id == prompt[pos]
        assert abs(plp[pos].logprob - ref[pos - 1, prompt[pos]].item()) < TOL, pos
        check_top(plp[pos].top, ref[pos - 1], prompt_top)
    lps = out.outputs[0].logprobs
    assert [e.token_id for e in lps] == tokens
    for i, entry in enumerate(lps):
        row = ref[len(prompt) - 1 + i]
        assert abs(entry.logprob - row[tokens[i]].item()) < TOL, i
        check_top(entry.top, row, output_top)


def spy_head_rows(llm: LLM) -> list[tuple[int, int]]:
    """Wrap every worker's forward; record (tokens in the step, rows given to the LM head)."""
    seen = []
    for worker in llm.engine.executor.workers.values():
        forward = worker.model.forward

        def spy(input_ids, positions, attn, rows, forward=forward):
            seen.append((len(input_ids), len(rows)))
            return forward(input_ids, positions, attn, rows)

        worker.model.forward = spy
    return seen


def spy_prompt_positions(llm: LLM) -> list[tuple[str, int]]:
    """Record (request, position) of every prompt logprob a step asks the worker for."""
    seen = []
    for worker in llm.engine.executor.workers.values():
        execute = worker.execute

        def spy(plan, execute=execute):
            for c in plan.chunks:
                ids = c.prompt_logprob_ids or []
                seen.extend((c.request_id, c.prompt_logprob_pos + i) for i in range(len(ids)))
            return execute(plan)

        worker.execute = spy
    return seen


@pytest.mark.parametrize("setup", [
    dict(block_size=4, max_num_batched_tokens=16),  # prompts in chunks of up to 16 tokens
    dict(block_size=8, num_instances=2, kv_blocks_per_instance=8),  # the 90-token one borrows
])
def test_prompt_and_output_logprobs_match_transformers(tiny_llama, hf_model, setup):
    llm = LLM(tiny_llama, **setup)
    batch = prompts([40, 9, 90], seed=1)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    for prompt, out in zip(batch, llm.generate(batch, params, use_tqdm=False)):
        check_against_hf(hf_model, prompt, out, prompt_top=2, output_top=3)
    llm.engine.check_integrity()


def test_sampled_logprobs_are_raw_whatever_the_temperature_and_penalties(tiny_llama, hf_model):
    """vLLM's default: logprobs of the model's logits, not of what temperature and penalties
    made of them."""
    llm = LLM(tiny_llama, block_size=8)
    prompt = prompts([12], seed=2)[0]
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=5, logprobs=1, ignore_eos=True,
                            repetition_penalty=1.3, presence_penalty=0.5, prompt_logprobs=0)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    check_against_hf(hf_model, prompt, out, prompt_top=0, output_top=1)


def test_prompt_logprobs_computed_once_across_preemption(tiny_llama, hf_model):
    """A pool too small for the batch preempts requests, which recompute their prompts; every
    prompt position is still asked of the worker once, and the values stay exact."""
    batch = prompts([3, 17, 40], seed=11)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=0,
                            prompt_logprobs=1)
    llm = LLM(tiny_llama, block_size=8, kv_blocks_per_instance=10, max_num_batched_tokens=32)
    asked = spy_prompt_positions(llm)
    outs = llm.generate(batch, params, use_tqdm=False)
    assert llm.engine.instances[0].scheduler.num_preemptions > 0
    for prompt, out in zip(batch, outs):
        positions = sorted(p for rid, p in asked if rid == out.request_id)
        assert positions == list(range(len(prompt) - 1))
        check_against_hf(hf_model, prompt, out, prompt_top=1, output_top=0)
    llm.engine.check_integrity()


def test_lm_head_runs_over_the_prompt_only_for_requests_that_ask(tiny_llama):
    # the batch runs twice: without the prefix cache, the second run computes its prompts again
    llm = LLM(tiny_llama, block_size=8, max_num_batched_tokens=256, enable_prefix_caching=False)
    rows = spy_head_rows(llm)
    batch = prompts([30, 20], seed=3)
    plain = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=5)
    llm.generate(batch, plain, use_tqdm=False)
    assert rows[0] == (50, 2)  # one prefill step: the two sampled rows only
    rows.clear()
    asking = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    llm.generate(batch, [plain, asking], use_tqdm=False)
    assert rows[0] == (50, 2 + 19)  # and the 19 prompt positions of the second prompt
    assert rows[1] == (2, 2)


def test_logprobs_validation(tiny_llama):
    with pytest.raises(ValueError, match="logprobs must be an int >= 0 or None, got -1"):
        SamplingParams(logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs must be an int >= 0 or None, got"):
        SamplingParams(prompt_logprobs=True)
    llm = LLM(tiny_llama, block_size=8)
    with pytest.raises(ValueError, match="logprobs must be at most the vocabulary size 512"):
        llm.generate([[1, 2]], SamplingParams(logprobs=513), use_tqdm=False)
