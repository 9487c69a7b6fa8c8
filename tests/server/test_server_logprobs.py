"""Logprobs, echo and sampling controls through the live server and the official `openai`
client, against Hugging Face transformers running the same default model in float32: prompt and
token logprobs within 1e-4 of its log-softmax, penalties against a float64 hand reference."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from infinillm.model.default_model import default_model_path

MODEL = "SmolLM2-135M-Instruct"
TOL = 1e-4
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXT = "The quick brown fox jumps over the lazy dog, twice: the quick brown fox."


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def hf_model():
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(served):
    return served.tokenizer


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], dim=-1)


def test_evaluation_request_scores_the_prompt_like_transformers(client, served, hf_model,
                                                                tokenizer):
    """echo, logprobs 1, max_tokens 0 (what evaluation harnesses send): the prompt back with
    per-token logprobs equal to transformers' log-softmax; a 1,000-token prompt too (it is
    prefilled in chunks, on blocks borrowed from the other instance)."""
    long_text = " ".join(f"item {i}," for i in range(180))
    reply = client.completions.create(model=MODEL, prompt=[TEXT, long_text], echo=True,
                                      logprobs=1, max_tokens=0, temperature=0)
    assert reply.usage.completion_tokens == 0
    for text, choice in zip([TEXT, long_text], reply.choices):
        ids = tokenizer.encode(text)
        assert choice.text == text and choice.finish_reason == "length"
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(ids) > 10
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = hf_logprobs(hf_model, ids)
        expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(lp.token_logprobs[1:])
        assert (got - expected).abs().max() < TOL
        # each position's top: the most likely token and the prompt's own
        best = ref[:-1].max(-1).values
        for k in range(1, len(ids)):
            top = lp.top_logprobs[k]
            assert top[lp.tokens[k]] == lp.token_logprobs[k] and 1 <= len(top) <= 2
            assert abs(max(top.values()) - best[k - 1].item()) < TOL
        assert "".join(lp.tokens) == text
        assert lp.text_offset == [sum(map(len, lp.tokens[:k])) for k in range(len(ids))]
    served.assert_idle()


def test_completion_logprobs_of_generated_tokens(client, hf_model, tokenizer):
    prompt = "Once upon a time"
    reply = client.completions.create(model=MODEL, prompt=prompt, logprobs=3, max_tokens=6,
                                      temperature=0)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 6
    ids = tokenizer.encode(prompt)
    generated = tokenizer.encode(choice.text, add_special_tokens=False)
    ref = hf_logprobs(hf_model, ids + generated)[len(ids) - 1:-1]
    assert (torch.tensor(lp.token_logprobs) - ref.max(-1).values).abs().max() < TOL
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    # echo puts the prompt's tokens first; the generated ones follow, offsets continuing
    echoed = client.completions.create(model=MODEL, prompt=prompt, logprobs=3, max_tokens=6,
                                       temperature=0, echo=True).choices[0]
    assert echoed.text == prompt + choice.text
    assert echoed.logprobs.tokens == [tokenizer.decode([i]) for i in ids] + lp.tokens
    assert echoed.logprobs.token_logprobs[len(ids):] == lp.token_logprobs
    assert echoed.logprobs.text_offset[len(ids):] == [o + len(prompt) for o in lp.text_offset]


def test_streamed_logprobs_equal_the_plain_ones(client):
    kwargs = dict(model=MODEL, prompt="My favourite animal is", logprobs=2, max_tokens=8,
                  temperature=0, echo=True)
    plain = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
    assert "".join(c.text for c in chunks) == plain.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        joined = [x for c in chunks if c.logprobs for x in getattr(c.logprobs, field)]
        assert joined == getattr(plain.logprobs, field), field
    chat = dict(model=MODEL, messages=QUESTION, logprobs=True, top_logprobs=2, max_tokens=8,
                temperature=0)
    plain = client.chat.completions.create(**chat).choices[0]
    streamed = [c.choices[0] for c in client.chat.completions.create(stream=True, **chat)]
    content = [e for c in streamed if c.logprobs for e in c.logprobs.content]
    # The same tokens; logprobs to fp32 rounding: the second request reads the first one's
    # prompt from the prefix cache, so its attention is summed in another order.
    assert [e.token for e in content] == [e.token for e in plain.logprobs.content]
    for got, want in zip(content, plain.logprobs.content):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.token for t in got.top_logprobs] == [t.token for t in want.top_logprobs]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            [t.logprob for t in want.top_logprobs], abs=1e-4)


def test_chat_logprobs_shape_and_values(client, hf_model, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, logprobs=True,
                                           top_logprobs=3, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens
    text = b"".join(bytes(e.bytes) for e in content).decode()
    assert text.startswith(choice.message.content)  # plus the end token's text, if it stopped
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - TOL
        assert e.token == bytes(e.bytes).decode("utf-8", errors="replace")
    prompt = tokenizer.encode(tokenizer.apply_chat_template(QUESTION), add_special_tokens=False)
    ref = hf_logprobs(hf_model, prompt)[-1]
    assert abs(content[0].logprob - ref.max().item()) < TOL
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(
        ref.topk(3).values.tolist(), abs=TOL)
    without = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2,
                                             temperature=0)
    assert without.choices[0].logprobs is None


def penalised_greedy(hf_model, prompt: list[int], n: int, frequency: float, presence: float,
                     repetition: float, bias: dict[int, float]) -> list[int]:
    """Greedy continuation of transformers' logits with the controls applied by hand in float64
    (vLLM's order: logit_bias, repetition, frequency, presence)."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            row = hf_model(torch.tensor([ids])).logits[0, -1].double()
        for t, b in bias.items():
            row[t] += b
        for t in set(ids):
            row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
        output = ids[len(prompt):]
        for t in set(output):
            row[t] -= frequency * output.count(t) + presence
        ids.append(int(row.argmax()))
    return ids[len(prompt):]


def test_penalties_and_logit_bias_match_a_hand_reference(client, hf_model, tokenizer):
    prompt = "List the numbers: one, two, one, two, one, two,"
    ids = tokenizer.encode(prompt)
    first = tokenizer.encode(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0).choices[0].text,
        add_special_tokens=False)[0]
    bias = {first: -100.0, 1010: 5.0}
    reply = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=10, temperature=0, frequency_penalty=0.8,
        presence_penalty=0.4, logit_bias={str(k): v for k, v in bias.items()},
        extra_body={"repetition_penalty": 1.3, "ignore_eos": True})
    expected = penalised_greedy(hf_model, ids, 10, 0.8, 0.4, 1.3, bias)
    assert reply.choices[0].text == tokenizer.decode(expected)
    assert first not in expected


def test_min_tokens_holds_back_stop_strings(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    word = full.split()[1]
    early = client.completions.create(stop=[word], **kwargs).choices[0]
    assert early.finish_reason == "stop" and early.text == full[: full.index(word)]
    late = client.completions.create(stop=[word], extra_body={"min_tokens": 12},
                                     **kwargs).choices[0]
    assert late.text == full and late.finish_reason == "length"


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty", "less than or equal"),
    ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty", "greater than"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias", "'abc'"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias", "got 101"),
    ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias", "[99999999]"),
    ("/v1/completions", {"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ("/v1/completions", {"max_tokens": 0}, None, "only allowed with echo"),
    ("/v1/completions", {"min_tokens": 5}, "min_tokens", "must be an int in [0, max_tokens=1]"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ("/v1/chat/completions", {"top_logprobs": 2}, None, "top_logprobs needs logprobs"),
])
def test_bad_values_are_400_naming_them(served, path, body, param, says):
    base = ({"prompt": "Hello"} if path == "/v1/completions" else {"messages": QUESTION})
    response = httpx.post(served.url + path, json={"model": MODEL, "max_tokens": 1, **base,
                                                   **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["param"] == param, error
