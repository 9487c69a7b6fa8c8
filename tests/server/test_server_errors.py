"""Bad, hostile and unauthorized requests: only 4xx with OpenAI error bodies, never 5xx, nothing
left queued, every pool full afterwards, and the server still healthy."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinillm.server import create_app

MODEL = "SmolLM2-135M-Instruct"
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Valid bodies that generate one token: mutations of them probe one field at a time.
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
token_ids = st.integers(-(2**40), 2**40) | st.sampled_from([-1, 49152, 10**30])
# Values that an endpoint must refuse, or accept cheaply (small token counts, few choices).
HOSTILE = {
    # beyond the default model's 8,192-token context: refused (a count just under it would be
    # valid, and a chat sampled at temperature 1 could then run for thousands of tokens)
    "max_tokens": st.integers(max_value=0) | st.integers(8193, 2**80) | st.just(2)
    | st.sampled_from([1.5, "3", True, [], {}]),
    "n": st.integers(max_value=0) | st.integers(129, 2**64) | st.sampled_from([2, 2.0, "2"]),
    "temperature": st.floats() | st.sampled_from([-1, 1e-300, 1e300, "0", True]),
    "top_p": st.floats() | st.sampled_from([0, -0.5, 1.0000001, 1e-300]),
    "seed": st.integers(-(2**80), 2**80) | st.sampled_from([1.0, "1", True]),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=20) | json_values,
    "prompt": st.sampled_from(["", [], [[]], ["a", 1], "x" * 700_000, [1] * 10_000,
                               [1] * 1500, [[1, 2], "b"]]) | st.lists(token_ids, max_size=4),
    "messages": st.sampled_from([[], [{}], [{"role": "user"}], [{"role": "tool", "content": "x"}],
                                 [{"role": "user", "content": None}],
                                 [{"role": "user", "content": [{"type": "image_url"}]}],
                                 [{"role": "user", "content": "y" * 200_000}],
                                 [{"role": "assistant", "content": "x"}] * 3]) | json_values,
    "stream": st.sampled_from([True, "true", 1, None]),
    "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": "yes"}, [],
                                       {"bogus": 1}]),
    "model": st.sampled_from(["gpt-4", "", None, 3, MODEL.lower()]),
    "stop_token_ids": st.lists(token_ids, max_size=3) | json_values,
    "top_k": st.integers(-(2**70), 2**70),
    "logit_bias": st.dictionaries(st.sampled_from(["0", "49151", "49152", "-1", "1e3", " 5"]),
                                  st.floats() | st.integers(-200, 200), max_size=3),
    "frequency_penalty": st.floats() | st.sampled_from([-2, 2, 2.0000001, "1"]),
    "presence_penalty": st.floats() | st.sampled_from([-2.0000001, True]),
    "repetition_penalty": st.floats() | st.sampled_from([0, -1, 1e-300]),
    "min_tokens": st.integers(-5, 5) | st.sampled_from([2**64, 1.0]),
    "logprobs": st.booleans() | st.integers(-3, 25),
    "top_logprobs": st.integers(-3, 25),
    "echo": st.booleans(),
}
FIELDS = sorted(HOSTILE) + ["best_of", "tools", "suffix", "max_completion_tokens", "user",
                            "ignore_eos", "unknown_field", "temperatur"]


def _value(field: str) -> st.SearchStrategy:
    # A random JSON value for a count field must not be a valid large count (slow, not bad);
    # nor may max_tokens be null (a chat then runs to the end of the context).
    def cheap(v) -> bool:
        if field in ("max_tokens", "max_completion_tokens", "n") and type(v) is int:
            return v <= 2 or v > 8192
        return v is not None or field != "max_tokens"

    generic = json_values.filter(cheap)
    return HOSTILE[field] | generic if field in HOSTILE else generic


@st.composite
def mutated(draw) -> tuple[str, dict]:
    path, body = draw(st.sampled_from([("/v1/completions", COMPLETION),
                                       ("/v1/chat/completions", CHAT)]))
    body = dict(body)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS))
        if field != "max_tokens" and draw(st.booleans()) and field in body:
            del body[field]
        else:
            body[field] = draw(_value(field))
    return path, body


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=60) as client:
        yield client


def check(response: httpx.Response) -> None:
    """2xx with a well-formed body, or 4xx with an OpenAI error body; never 5xx."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert "param" in error and "code" in error
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
        assert '"error"' not in response.text
    else:
        assert isinstance(response.json(), dict)


def send(http: httpx.Client, path: str, body) -> httpx.Response:
    # allow_nan: NaN and Infinity go out as the bare tokens a sloppy client would send.
    return http.post(path, content=json.dumps(body, allow_nan=True),
                     headers={"content-type": "application/json"})


@pytest.mark.slow  # 130 requests, many of which generate tokens
@settings(max_examples=130, **SETTINGS)
@given(case=mutated())
def test_mutated_requests(http, case):
    check(send(http, *case))


@settings(max_examples=90, **SETTINGS)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=json_values)
def test_random_json_bodies(http, path, body):
    check(send(http, path, body))


@settings(max_examples=80, **SETTINGS)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models",
                             "/v1/cluster", "/v1/nothing", "/v2/completions", "/health"]),
       ctype=st.sampled_from([None, "application/json", "text/plain", "multipart/form-data",
                              "application/x-www-form-urlencoded", "application/json; x=y",
                              "application/vnd.api+json", "", "\u00e9/\u00e9"]),
       raw=st.binary(max_size=64) | st.just(b'{"prompt": "a", "max_tokens": 1'))
def test_raw_bytes_methods_and_content_types(http, method, path, ctype, raw):
    headers = {} if ctype is None else {"content-type": ctype.encode("utf-8")}
    try:
        response = http.request(method, path, content=raw, headers=headers)
    except httpx.LocalProtocolError:  # the client refuses to send that header at all
        return
    check(response)


def test_after_the_storm_every_pool_is_full_and_the_server_healthy(http, served):
    served.assert_idle()
    assert http.get("/health").status_code == 200
    metrics = http.get("/metrics").text
    assert 'status="500"' not in metrics and 'status="503"' not in metrics


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": "a", "max_tokens": "4"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "bogus": 1}, 200, None),  # ignored
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": [1] * 1500, "max_tokens": 1}, 400, "prompt"),  # > cluster
    ("/v1/completions", {"prompt": [1] * 9000, "max_tokens": 1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 9000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 49152]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 2,
                              "max_tokens": 1}, 200, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
])
def test_specific_errors(http, path, body, status, param):
    response = send(http, path, body)
    assert response.status_code == status, response.text
    if status >= 400:
        assert response.json()["error"]["param"] == param


def test_limits_and_content_types(served):
    async def go():
        app = create_app(served.async_engine, MODEL, max_body_bytes=1000)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            big = await client.post("/v1/completions", json={"prompt": "a" * 2000})
            form = await client.post("/v1/completions", data={"prompt": "a"})
            bad = await client.post("/v1/completions", content=b"{nope",
                                    headers={"content-type": "application/json"})
            route = await client.get("/v1/nothing")
            return big, form, bad, route

    big, form, bad, route = asyncio.run(go())
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert form.status_code == 415
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert route.status_code == 404 and "no route" in route.json()["error"]["message"]


def test_api_key(served):
    async def go():
        app = create_app(served.async_engine, MODEL, api_key="sk-secret")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            body = {"prompt": "Hi", "max_tokens": 1}
            return [
                await client.post("/v1/completions", json=body),
                await client.post("/v1/completions", json=body,
                                  headers={"Authorization": "Bearer sk-wrong"}),
                await client.get("/v1/cluster", headers={"Authorization": "sk-secret"}),
                await client.post("/v1/completions", json=body,
                                  headers={"Authorization": "Bearer sk-secret"}),
                await client.get("/health"),
                await client.get("/"),
            ]

    missing, wrong, no_bearer, right, health, page = asyncio.run(go())
    for r in (missing, wrong, no_bearer):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200 and health.status_code == 200 and page.status_code == 200


def test_tiny_temperature_is_greedy(http):
    body = {"prompt": "Once upon a time", "max_tokens": 4}
    greedy = send(http, "/v1/completions", {**body, "temperature": 0}).json()
    tiny = send(http, "/v1/completions", {**body, "temperature": 1e-300}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
