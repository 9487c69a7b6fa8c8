"""A client that leaves aborts its requests: their blocks, local and lent, are free again
within a step or two, for streams and for plain requests alike."""

from __future__ import annotations

import json
import socket
import time

import httpx

LONG = {"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}


def _borrowing_prompt() -> list[int]:
    # Longer than one instance's pool (48 blocks of 16 tokens): the owner must borrow.
    return [(7 * i) % 40000 + 100 for i in range(1000)]


def _events(response: httpx.Response, count: int):
    """The first `count` data events; the line iterator is returned too, because closing it
    (a `for` loop's break does) closes the connection."""
    lines = response.iter_lines()
    events = []
    while len(events) < count:
        line = next(lines)
        if line.startswith("data: {"):
            events.append(json.loads(line[6:]))
    return events, lines


def test_stream_disconnect_frees_local_blocks(served):
    with httpx.Client(base_url=served.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            events, _lines = _events(r, 3)
            assert all(e["choices"][0]["finish_reason"] is None for e in events)
            stats = served.cluster()
            assert sum(i["used_blocks"] for i in stats["instances"]) > 0, stats
            assert sum(i["running"] for i in stats["instances"]) == 1, stats
    served.assert_idle()


def test_stream_disconnect_frees_lent_blocks(served):
    body = {"prompt": _borrowing_prompt(), "max_tokens": 500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=served.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            _, _lines = _events(r, 1)
            stats = served.cluster()
            assert stats["debts"], f"the long prompt should have borrowed blocks: {stats}"
            assert sum(i["lent_blocks"] for i in stats["instances"]) > 0
    served.assert_idle()


def test_disconnect_while_waiting_for_a_plain_reply(served):
    with httpx.Client(base_url=served.url, timeout=1.0) as client:
        try:
            client.post("/v1/completions", json=LONG)
            raise AssertionError("a 2000-token reply should not arrive within a second")
        except httpx.ReadTimeout:
            pass  # the client closes the connection
    served.assert_idle()


def test_chat_stream_disconnect_with_n_choices(served):
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "n": 3,
            "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=served.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            _, _lines = _events(r, 6)
            stats = served.cluster()
            assert sum(i["running"] + i["waiting"] for i in stats["instances"]) == 3
    served.assert_idle()


def test_a_client_that_closes_right_after_sending_leaves_nothing(served):
    host, port = served.url.removeprefix("http://").split(":")
    for stream in (True, False):
        body = json.dumps({**LONG, "stream": stream}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
        time.sleep(0.5)  # whatever the server queued by now must be aborted
        served.assert_idle()
    metrics = httpx.get(f"{served.url}/metrics", timeout=60).text
    assert 'status="500"' not in metrics  # a body cut short is 499, not an internal error
