"""Penalties, logit_bias and min_tokens through the engine, against independent references:
greedy continuations of Hugging Face transformers' own model (tiny random Llama, float32) with
the control applied by hand in float64, or by transformers' RepetitionPenaltyLogitsProcessor."""

from __future__ import annotations

import pytest
import torch

from infinillm import LLM, SamplingParams

NEW_TOKENS = 12
EOS = 2  # the tiny model's eos_token_id (LlamaConfig's default)


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, block_size=8, max_num_batched_tokens=24)


def hf_greedy(hf_model, prompt: list[int], n: int, control) -> list[int]:
    """Greedy tokens of transformers' logits after `control(ids, logits float64)`."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1].double()
        ids.append(int(control(ids, logits).argmax()))
    return ids[len(prompt):]


def prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # a small alphabet, so that prompts repeat tokens and penalties bite
    return [torch.randint(0, 40, (length,), generator=gen).tolist()
            for length in [30, 7, 19][:n]]


def frequency_presence(prompt_len: int, frequency: float, presence: float):
    def control(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        output = ids[prompt_len:]
        for t in set(output):
            logits[t] -= frequency * output.count(t) + presence
        return logits
    return control


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 2.0), (0.7, -0.4)])
def test_frequency_and_presence_penalties_match_a_hand_reference(llm, hf_model, frequency,
                                                                 presence):
    batch = prompts(3, seed=1)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                            frequency_penalty=frequency, presence_penalty=presence)
    plain = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate(batch, [params, plain, params], use_tqdm=False)
    for prompt, out, p in zip(batch, outs, [params, plain, params]):
        control = frequency_presence(len(prompt), p.frequency_penalty, p.presence_penalty)
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, NEW_TOKENS, control)
    # the penalties change the continuation: the test compares something
    assert outs[0].outputs[0].token_ids != llm.generate(batch[:1], plain, use_tqdm=False)[0] \
        .outputs[0].token_ids


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers_processor(llm, hf_model, penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    processor = RepetitionPenaltyLogitsProcessor(penalty)

    def control(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        return processor(torch.tensor([ids]), logits[None].float())[0].double()

    batch = prompts(3, seed=2)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                            repetition_penalty=penalty)
    outs = llm.generate(batch, params, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, NEW_TOKENS, control)


def test_logit_bias_matches_a_hand_reference(llm, hf_model):
    prompt = prompts(1, seed=3)[0]
    bias = {17: 6.0, 31: -100.0, 4: 2.5}
    reference_argmax = hf_greedy(hf_model, prompt, 1, lambda ids, x: x)[0]
    bias[reference_argmax] = -100.0  # the unbiased first choice is never taken

    def control(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for t, b in bias.items():
            logits[t] += b
        return logits

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                            logit_bias=bias)
    tokens = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert tokens == hf_greedy(hf_model, prompt, NEW_TOKENS, control)
    assert reference_argmax not in tokens


def test_min_tokens_holds_back_eos_and_stop_ids(llm):
    prompt = prompts(1, seed=4)[0]
    eager = {EOS: 100.0}  # EOS whenever it may be sampled
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logit_bias=eager,
                            min_tokens=5)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == EOS and out.finish_reason == "stop"
    assert EOS not in out.token_ids[:5]
    # with ignore_eos, only the stop id is held back (EOS is then an ordinary token)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logit_bias={EOS: 90, 9: 100},
                            min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [EOS, EOS, EOS, 9] and out.finish_reason == "stop"


def test_seeded_requests_with_penalties_are_reproducible(llm):
    batch = prompts(3, seed=5)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=7, ignore_eos=True,
                            frequency_penalty=0.5, repetition_penalty=1.2,
                            logit_bias={3: 1.0}, min_tokens=2)
    alone = llm.generate(batch[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.8, ignore_eos=True)
    mixed = llm.generate([batch[1], batch[0], batch[2]], [others, params, others],
                         use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    unseeded = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, ignore_eos=True)
    assert llm.generate(batch[:1], unseeded, use_tqdm=False)[0].outputs[0].token_ids != alone
    llm.engine.check_integrity()


@pytest.mark.parametrize("kwargs, match", [
    ({"presence_penalty": 2.5}, r"presence_penalty must be a number in \[-2, 2\], got 2.5"),
    ({"frequency_penalty": -3}, r"frequency_penalty must be a number in \[-2, 2\], got -3"),
    ({"frequency_penalty": float("nan")}, "got nan"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0, got 0"),
    ({"repetition_penalty": float("inf")}, "got inf"),
    ({"logit_bias": {5: 101}}, r"logit_bias of token 5 must be a number in \[-100, 100\]"),
    ({"logit_bias": {"5": 1}}, "logit_bias keys must be token ids .* got '5'"),
    ({"min_tokens": 20, "max_tokens": 10}, r"min_tokens must be an int in \[0, max_tokens=10\], "
                                           "got 20"),
    ({"min_tokens": -1}, "got -1"),
])
def test_controls_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_logit_bias_token_ids_checked_against_the_vocabulary(llm):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\), got \[512\]"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={512: 1.0}), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
