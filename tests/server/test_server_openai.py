"""The official `openai` client against a live server: completions, chat, streaming, usage,
n > 1 with seeds, stop strings, batches of prompts, and concurrent streams in one batch."""

from __future__ import annotations

import asyncio

import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_models_and_chat_answer(client, served):
    assert [m.id for m in client.models.list().data] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16,
                                           temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == MODEL
    # The server's reply equals the offline engine's: same template, tokens and stop rules.
    usage = reply.usage
    assert usage.prompt_tokens > 10 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    served.assert_idle()


def test_chat_stream_concatenates_to_the_plain_reply(client):
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10,
                                           temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == plain.choices[0].finish_reason and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_usage_and_max_tokens(client):
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7,
                                      temperature=0)
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 7 and plain.usage.prompt_tokens == 4
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.total_tokens == 11
    # No stream_options: no usage chunk.
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=3, temperature=0, stream=True))
    assert all(c.choices for c in chunks)


def test_prompt_as_token_ids_and_as_a_batch(client, served):
    ids = served.tokenizer.encode("Once upon a time")
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5,
                                     temperature=0).choices[0].text
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=5,
                                     temperature=0).choices[0].text == text
    assert client.completions.create(model=MODEL, prompt=["Once upon a time"], max_tokens=5,
                                     temperature=0).choices[0].text == text
    batch = client.completions.create(model=MODEL, prompt=["Hello", "Once upon a time"], n=2,
                                      max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[2].text == batch.choices[3].text == text
    assert batch.usage.prompt_tokens == len(ids) + 1 and batch.usage.completion_tokens == 20


def test_n_with_a_seed_gives_seed_plus_index(client):
    kwargs = dict(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0)
    both = client.completions.create(n=2, seed=7, **kwargs)
    assert [c.index for c in both.choices] == [0, 1]
    first = client.completions.create(seed=7, **kwargs).choices[0].text
    second = client.completions.create(seed=8, **kwargs).choices[0].text
    assert [c.text for c in both.choices] == [first, second]
    assert first != second
    assert both.usage.completion_tokens == 16
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, seed=3,
                                          max_tokens=6, temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1]


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                     temperature=0).choices[0].text
    word = full.split()[2]
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                    temperature=0, stop=[word, "zzz"]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(word)]
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                         temperature=0, stop=word, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_concurrent_streams_equal_one_by_one_results(served):
    prompts = ["Once upon a time", "The weather today", "My name is", "In 1492,",
               "The best way to learn", "Paris is", "def fibonacci(n):", "Dear diary,"]
    sync = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    alone = [sync.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
             .choices[0].text for p in prompts]

    async def stream_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)

        async def one(prompt: str) -> str:
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                                     temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    assert asyncio.run(stream_all()) == alone
    served.assert_idle()
