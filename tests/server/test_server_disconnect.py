"""A client that leaves aborts its requests: their blocks, local and lent, are free again
within a step or two, for streams and for plain requests alike."""

from __future__ import annotations

import json
import socket

import httpx

COMPLETIONS = "/v1/completions"
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


def _post(served, body: dict) -> socket.socket:
    """Send a POST /v1/completions on a raw socket and return it unread: closing it is the
    client leaving, at a moment the test chooses."""
    host, port = served.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head + data)
    return sock


def test_disconnect_while_waiting_for_a_plain_reply(served):
    before = served.requests_by_status(COMPLETIONS)
    with _post(served, LONG):
        # Leave once the engine runs the request: its 2000 tokens take a minute here.
        served.wait_for("the request to run",
                        lambda s: sum(i["running"] for i in s["instances"]) == 1)
    # The server saw the client leave: it answered 499 (to nobody) and counted it.
    assert served.wait_requests_done(COMPLETIONS, before) == {"499": 1}
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
    for stream in (True, False):
        before = served.requests_by_status(COMPLETIONS)
        _post(served, {**LONG, "stream": stream}).close()
        # Wait until the server is done with the request (it counts it then), so whatever it
        # queued has been aborted, not merely not yet admitted.
        done = served.wait_requests_done(COMPLETIONS, before)
        assert sum(done.values()) == 1, done
        served.assert_idle()
    metrics = httpx.get(f"{served.url}/metrics", timeout=60).text
    assert 'status="500"' not in metrics  # a body cut short is 499, not an internal error
