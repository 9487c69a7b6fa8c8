"""The embedded default model (SmolLM2-135M-Instruct) through the offline API."""

from __future__ import annotations

import pytest

from infinillm import LLM, SamplingParams

# Loads and runs the real default model (135M parameters): seconds per test on 2 cores.
pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_blocks_per_instance=256)


def test_answers_paris(llm):
    out = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended on <|im_end|>
    assert out.outputs[0].token_ids[-1] in llm.get_tokenizer().eos_token_ids
    llm.engine.check_integrity()


def test_stop_string_cuts_text(llm):
    greedy = SamplingParams(max_tokens=24, temperature=0)
    full = llm.chat(QUESTION, greedy, use_tqdm=False)[0].outputs[0].text
    assert " is " in full
    cut = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0, stop=" is "),
                   use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(" is ")]
    kept = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0, stop=[" is "],
                                             include_stop_str_in_output=True),
                    use_tqdm=False)[0].outputs[0]
    assert kept.text == full[: full.index(" is ") + 4]


def test_stop_token_ids_max_tokens_and_ignore_eos(llm):
    tok = llm.get_tokenizer()
    greedy = SamplingParams(max_tokens=24, temperature=0)
    ids = llm.chat(QUESTION, greedy, use_tqdm=False)[0].outputs[0].token_ids
    out = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0,
                                            stop_token_ids=[ids[2]]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ids[:3] and out.outputs[0].finish_reason == "stop"
    out = llm.chat(QUESTION, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ids[:4] and out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == tok.decode(ids[:4])
    out = llm.chat(QUESTION, SamplingParams(max_tokens=len(ids) + 5, temperature=0,
                                            ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == len(ids) + 5
    assert out.outputs[0].token_ids[: len(ids)] == ids


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = llm.generate("Once upon a time", p, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(["Hello there", "Once upon a time", "The weather"],
                         [SamplingParams(max_tokens=12, temperature=1.0), p,
                          SamplingParams(max_tokens=5, temperature=0)], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_text_matches_full_decode(llm):
    """Incremental detokenization gives exactly the tokenizer's decode of the output."""
    tok = llm.get_tokenizer()
    prompts = ["Écris une phrase en français avec des accents:", "日本語で一文を書いて:",
               "Emoji time 🎉🚀:"]
    for out in llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.8, seed=3),
                            use_tqdm=False):
        c = out.outputs[0]
        assert c.text == tok.decode(c.token_ids)
        assert "\ufffd" not in c.text or "\ufffd" in tok.decode(c.token_ids)
