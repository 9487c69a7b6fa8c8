"""1,000 hostile requests across every endpoint, in process, against a tiny random model that
has the default model's tokenizer and chat template: malformed, oversized and deeply nested
JSON, invalid UTF-8, wrong types, negative, huge, NaN and infinite numbers, huge n / max_tokens /
stop lists, odd methods, paths, headers and query strings. Every answer is 2xx with a well-formed
body or 4xx with an OpenAI error body, never 5xx; unknown but well-formed fields are ignored;
afterwards the server is healthy and every pool is full.

The number of requests per test is its `max_examples` (one request per example); BUDGET sums
them, and the last test checks that the server counted that many.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from infinillm import LLM
from infinillm.engine import AsyncEngine
from infinillm.model.default_model import default_model_path
from infinillm.server import create_app

MODEL = "tiny"
MAX_MODEL_LEN = 1024
MAX_BODY_BYTES = 256 << 10  # small, so that oversized bodies are cheap to send
BLOCKS_PER_INSTANCE = 24  # 384 tokens: requests of a few hundred tokens borrow
BUDGET = {"completion": 250, "chat": 200, "unknown": 100, "raw": 200, "routes": 250}
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def _tiny_model_with_the_default_tokenizer(folder) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=MAX_MODEL_LEN, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = _tiny_model_with_the_default_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))
    llm = LLM(folder, num_instances=2, kv_blocks_per_instance=BLOCKS_PER_INSTANCE)
    async_engine = AsyncEngine(llm.engine)
    async_engine.start()
    app = create_app(async_engine, MODEL, max_body_bytes=MAX_BODY_BYTES)
    with TestClient(app, base_url="http://t") as client:
        yield client, async_engine
    async_engine.shutdown()
    llm.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return server[0]


# ---- values ---------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
numbers = (st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from(
    [NAN, INF, -INF, 0, -1, -0.0, 1e-320, 1e308, 2**63, -(2**63), 10**30, 1.5]))
texts = (st.text(max_size=16)
         | st.sampled_from(["", "\x00", "\ud800", "\udfff", "\u202e", "{{ x }}", "\ufeff",
                            "<|im_end|>", "\U0001f600" * 8, "a" * 5000]))
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(texts, kids, max_size=4), max_leaves=12)
token_ids = st.integers(-(2**40), 2**40) | st.sampled_from([-1, 0, 49151, 49152, 10**30])
COUNTS = ("max_tokens", "max_completion_tokens", "n", "best_of")
# Per field, values that must be refused or are cheap to serve (a few tokens, a few choices).
HOSTILE = {
    "max_tokens": st.integers(max_value=0) | st.integers(1025, 2**80) | st.integers(1, 3)
    | st.sampled_from([1.0, "3", True, [], {}, NAN, INF]),
    "max_completion_tokens": st.integers(max_value=0) | st.integers(1025, 2**80)
    | st.integers(1, 3),
    "n": st.integers(max_value=0) | st.integers(129, 2**64) | st.integers(1, 2)
    | st.sampled_from([2.0, "2", NAN, -INF]),
    "best_of": st.integers(-5, 300),
    "temperature": numbers | st.sampled_from(["0", True, None]),
    "top_p": numbers,
    "top_k": numbers,
    "seed": numbers | st.sampled_from(["1", True]),
    "stop": texts | st.lists(texts, max_size=20) | st.lists(st.just("x"), min_size=17,
                                                            max_size=10_000),
    "stop_token_ids": st.lists(token_ids, max_size=3) | st.lists(st.just(5), max_size=10_000),
    "stream": st.sampled_from([True, False, "true", 1, None]),
    "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": "yes"}, [],
                                       {"include_usage": None}, {"bogus": 1}]),
    "model": st.sampled_from(["gpt-4", "", None, 3, "TINY", "tiny\x00", MODEL]),
    "frequency_penalty": numbers,
    "presence_penalty": numbers,
    "logit_bias": st.dictionaries(texts, numbers, max_size=3),
    "ignore_eos": st.booleans() | st.sampled_from(["yes", 1]),
    "user": texts,
}
PROMPTS = (st.sampled_from(["", [], [[]], ["a", 1], "x" * 200_000, [1] * 1500, [1] * 300,
                            ["a"] * 129, [[1, 2], "b"], [[1]] * 3, "\ud800", "Hello"])
           | st.lists(token_ids, max_size=4) | texts)
CONTENTS = (texts | st.sampled_from([None, [], [{"type": "text", "text": "hi"}],
                                     [{"type": "image_url", "image_url": "x"}],
                                     [{"type": "text"}], "y" * 100_000]))
MESSAGES = (st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "", 1])},
    optional={"content": CONTENTS, "name": texts}), max_size=4)
    | st.sampled_from([[{"role": "user", "content": "z"}] * 5000]) | json_values)
COMPLETION_ONLY = {"prompt": PROMPTS, "echo": json_values, "logprobs": json_values,
                   "suffix": json_values}
CHAT_ONLY = {"messages": MESSAGES, "logprobs": json_values, "top_logprobs": json_values,
             "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {},
                                                 {"type": NAN}]) | json_values,
             "tools": json_values, "tool_choice": json_values,
             "parallel_tool_calls": json_values}


def _cheap(body: dict) -> bool:
    """A request that would be valid must stay cheap: a few tokens per choice, a few choices
    (a chat without max_tokens would run to the end of the context)."""
    for name in COUNTS:
        v = body.get(name)
        if type(v) is int and 3 < v <= MAX_MODEL_LEN and (name != "best_of" or v <= 128):
            return False
    if "messages" in body and body.get("max_tokens") is None:
        if not isinstance(body.get("max_completion_tokens"), int):
            return False
    return True


@st.composite
def mutated(draw, path: str) -> dict:
    body = ({"model": MODEL, "prompt": "Hello", "max_tokens": 1} if path == COMPLETIONS
            else {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 1})
    fields = {**HOSTILE, **(COMPLETION_ONLY if path == COMPLETIONS else CHAT_ONLY)}
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(sorted(fields)))
        if name in body and draw(st.integers(0, 4)) == 0:
            del body[name]
        else:
            body[name] = draw(fields[name] | json_values)
    return body


def encode(body) -> bytes:
    """JSON as a sloppy client writes it: NaN and Infinity as bare tokens, lone surrogates
    escaped (invalid in JSON text)."""
    return json.dumps(body, allow_nan=True).encode()


# ---- checks ---------------------------------------------------------------------------------

def check(response, body=None) -> None:
    """2xx with a well-formed body, or 4xx with an OpenAI error body; never 5xx. An error's
    `param` names a field of the request."""
    event(f"HTTP {response.status_code}")  # shown by --hypothesis-show-statistics
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert error["type"] == "invalid_request_error", error
        if isinstance(body, dict) and error["param"] is not None:
            top = error["param"].split(".")[0]
            assert top in body or top in ("n", "max_tokens", "prompt", "messages"), error
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = response.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], response.text[-200:]
        for sse in events[:-2]:
            assert "error" not in json.loads(sse.removeprefix("data: ")), sse
    else:
        assert isinstance(response.json(), dict)


def post(client, path: str, content: bytes, ctype: str = "application/json"):
    return client.post(path, content=content, headers={"content-type": ctype})


# ---- the requests -----------------------------------------------------------------------------

@settings(max_examples=BUDGET["completion"], **SETTINGS)
@given(body=mutated(COMPLETIONS).filter(_cheap))
def test_hostile_completion_bodies(client, body):
    check(post(client, COMPLETIONS, encode(body)), body)


@settings(max_examples=BUDGET["chat"], **SETTINGS)
@given(body=mutated(CHAT).filter(_cheap))
def test_hostile_chat_bodies(client, body):
    check(post(client, CHAT, encode(body)), body)


unknown_names = st.text(min_size=1, max_size=12).filter(
    lambda k: k not in HOSTILE and k not in COMPLETION_ONLY and k not in CHAT_ONLY
    and k not in ("max_tokens", "max_completion_tokens"))


def _well_formed(value) -> bool:
    """Valid JSON text once encoded: no NaN or infinities, no lone surrogates."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, UnicodeEncodeError):
        return False
    return True


@settings(max_examples=BUDGET["unknown"], **SETTINGS)
@given(path=st.sampled_from([COMPLETIONS, CHAT]),
       extra=st.dictionaries(unknown_names.filter(_well_formed),
                             json_values.filter(_well_formed), min_size=1, max_size=4))
def test_unknown_well_formed_fields_are_ignored(client, path, extra):
    body = ({"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0} if path == COMPLETIONS
            else {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                  "temperature": 0})
    response = post(client, path, encode({**extra, **body}))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def _nested(depth: int) -> bytes:
    return b'{"prompt": "a", "max_tokens": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"


RAW = st.sampled_from([
    b"", b"null", b"[]", b"1e999", b'"prompt"', b"{", b'{"prompt": "a", "max_tokens": 1',
    b'{"prompt": "\xff\xfe", "max_tokens": 1}', b'{"prompt": "\xc3\x28", "max_tokens": 1}',
    b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}', b'\xef\xbb\xbf{"prompt": "a"}',
    b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}",
    b'{"prompt": "a", "max_tokens": 1e2}', b'{"prompt": "a", "max_tokens": -0}',
    b'{"prompt": "a", "max_tokens": 1, "max_tokens": null}',
    b'{"prompt": "a", "temperature": Infinity}', b'{"prompt": "a", "top_p": -NaN}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
    b'{"prompt": "a"}' * 3, b"\x00" * 64, _nested(100), _nested(1000), _nested(100_000),
    b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}',
    b'{"prompt": [' + b"1," * (MAX_BODY_BYTES // 2) + b"1]}",
    b'{"prompt": [' + b"1," * (MAX_BODY_BYTES // 2 - 20) + b"1]}",
]) | st.binary(max_size=64) | json_values.map(encode)


@settings(max_examples=BUDGET["raw"], **SETTINGS)
@given(path=st.sampled_from([COMPLETIONS, CHAT]), raw=RAW,
       ctype=st.sampled_from(["application/json", "application/json; charset=latin-1",
                              "application/vnd.x+json", "text/plain", "", "multipart/form-data",
                              "application/json;;;"]))
def test_raw_bytes(client, path, raw, ctype):
    check(post(client, path, raw, ctype))


@settings(max_examples=BUDGET["routes"], **SETTINGS)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(["/", "/health", "/metrics", "/v1/models", "/v1/cluster",
                             "/v1/completions", "/v1/chat/completions", "/v1/nothing",
                             "/v1/models/tiny", "//v1/models", "/v1/../health", "/%ff",
                             "/v1/%00", "/v1/completions/", "/" + "a" * 5000]),
       query=st.sampled_from(["", "?x=1", "?%ff=%00", "?" + "a=b&" * 500, "?model=gpt-4"]),
       headers=st.dictionaries(st.sampled_from(["authorization", "accept", "x-request-id",
                                                "accept-encoding", "content-type"]),
                               st.text("abc/;=*\u00e9", max_size=20), max_size=3),
       raw=st.binary(max_size=32) | st.just(b'{"prompt": "a", "max_tokens": 1}'))
def test_every_route_with_odd_methods_queries_and_headers(client, method, path, query, headers,
                                                          raw):
    headers = {k: v.encode("latin-1") for k, v in headers.items()}
    response = client.request(method, path + query, content=raw, headers=headers)
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and method != "HEAD":
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path, body, param, named", [
    (COMPLETIONS, {"prompt": "a", "logit_bias": {"50": 500}}, "logit_bias", "500"),
    (COMPLETIONS, {"prompt": "a", "frequency_penalty": 2.5}, "frequency_penalty", "2.5"),
    (COMPLETIONS, {"prompt": "a", "best_of": 3}, "best_of", "3"),
    (COMPLETIONS, {"prompt": "a", "stop": ["x"] * 17}, "stop", "17 strings"),
    (COMPLETIONS, {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options",
     "{'include_usage': True}"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
     "tools", "[{'type': 'function'}]"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "x"}},
     "response_format", "{'type': 'x'}"),
])
def test_unsupported_or_out_of_range_values_are_named(client, path, body, param, named):
    response = post(client, path, encode(body))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and named in error["message"], error


def test_too_many_prompts_are_refused_before_any_is_tokenized(client, monkeypatch):
    server = client.app.state.server
    calls = []
    monkeypatch.setattr(server, "_tokenize", lambda *args: calls.append(args))
    body = {"prompt": ["a"] * 65, "n": 2, "max_tokens": 1}
    response = post(client, COMPLETIONS, encode(body))
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    assert "65 prompts x n=2" in response.json()["error"]["message"]
    assert calls == []


def test_after_the_storm_the_server_is_healthy_and_every_pool_full(server):
    client, async_engine = server
    assert client.get("/health").status_code == 200
    # Every request has had its reply, so whatever it queued was aborted or finished; the
    # engine thread runs this after those commands.
    unfinished, free = async_engine.call(
        lambda e: (e.has_unfinished_requests(), e.num_free_blocks()))
    assert not unfinished
    assert free == [BLOCKS_PER_INSTANCE] * 2
    async_engine.check_integrity()
    stats = client.get("/v1/cluster").json()
    assert stats["debts"] == [] and all(i["lent_blocks"] == 0 for i in stats["instances"])
    families = client.get("/metrics").text
    counted = {}
    for line in families.splitlines():
        if line.startswith("infinillm_http_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            counted[status] = counted.get(status, 0) + float(line.rsplit(" ", 1)[1])
    assert not any(s.startswith("5") for s in counted), counted
    assert sum(counted.values()) >= sum(BUDGET.values()), counted


def test_a_stopped_engine_gives_503(server):
    stopped = AsyncEngine(server[1].engine)  # never started: its loop is not alive

    async def go():
        app = create_app(stopped, MODEL)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            return (await client.get("/health"),
                    await client.post("/v1/completions", json={"prompt": "Hi"}))

    health, completion = asyncio.run(go())
    assert health.status_code == 503 and completion.status_code == 503
    assert completion.json()["error"]["code"] == "engine_unavailable"
