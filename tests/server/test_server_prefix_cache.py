"""Prefix caching through the API: usage.prompt_tokens_details.cached_tokens (completions, chat,
streamed usage), read by the official `openai` client, and the hit counters of /metrics."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

# A prompt of several full 16-token blocks, unlike any other test's.
PROMPT = ("Prefix caching test. " + "The quick brown fox jumps over the lazy dog, twice. " * 12)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=60).text
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("infinillm_prefix_cache_")}


def test_a_repeated_prompt_reports_its_cached_tokens(served, client):
    before = _counters(served.url)
    first = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=2,
                                      temperature=0)
    n = first.usage.prompt_tokens
    assert n > 48 and first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=2,
                                       temperature=0)
    whole = (n - 1) // 16 * 16  # every full block but the one holding the last prompt token
    assert second.usage.prompt_tokens_details.cached_tokens == whole
    assert second.choices[0].text == first.choices[0].text
    stream = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=2,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None]
    assert [u.prompt_tokens_details.cached_tokens for u in usage] == [whole]
    after = _counters(served.url)
    assert after["infinillm_prefix_cache_queries_total"] - before.get(
        "infinillm_prefix_cache_queries_total", 0) == 3 * n
    assert after["infinillm_prefix_cache_hits_total"] - before.get(
        "infinillm_prefix_cache_hits_total", 0) == 2 * whole
    stats = served.cluster()
    assert stats["prefix_caching"] is True
    assert sum(i["cached_blocks"] for i in stats["instances"]) >= n // 16
    served.assert_idle()


def test_chat_reports_cached_tokens_of_a_shared_system_prompt(served, client):
    system = {"role": "system", "content": PROMPT.replace("twice", "thrice")}
    usages = []
    for question in ("Who jumps?", "Over whom?"):
        reply = client.chat.completions.create(
            model=served.model, max_tokens=2, temperature=0,
            messages=[system, {"role": "user", "content": question}])
        usages.append(reply.usage)
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    # the second shares every full block of the system prompt, up to the first differing token
    assert 48 <= usages[1].prompt_tokens_details.cached_tokens < usages[1].prompt_tokens
    assert usages[1].prompt_tokens_details.cached_tokens % 16 == 0
    served.assert_idle()
