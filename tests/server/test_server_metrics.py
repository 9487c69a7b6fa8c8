"""GET /metrics (Prometheus text), GET /v1/cluster (the ledger), GET /health."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{url}/metrics", timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def test_metrics_cover_requests_latency_and_the_cluster(served):
    before = _samples(served.url)
    body = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    url = f"{served.url}/v1/completions"
    assert httpx.post(url, json=body, timeout=60).status_code == 200
    assert httpx.post(url, json={"prompt": 1}, timeout=60).status_code == 400
    after = _samples(served.url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    ok = {"endpoint": "/v1/completions", "status": "200"}
    assert delta("infinillm_http_requests_total", **ok) == 1
    assert delta("infinillm_http_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("infinillm_time_to_first_token_seconds_count") == 1
    assert delta("infinillm_time_per_output_token_seconds_count") == 1
    assert delta("infinillm_generation_tokens_total") == 5
    assert delta("infinillm_prompt_tokens_total") == 4
    stats = served.cluster()
    for inst in stats["instances"]:
        i = str(inst["instance"])
        for name in ("free_blocks", "used_blocks", "lent_blocks", "borrowed_blocks",
                     "total_blocks", "num_requests_running", "num_requests_waiting"):
            assert (f"infinillm_{name}", (("instance", i),)) in after, name
        assert after[("infinillm_free_blocks", (("instance", i),))] == inst["total_blocks"]
    for name in ("remote_attention_calls", "remote_bytes", "migrations", "preemptions"):
        assert after[(f"infinillm_{name}_total", ())] == stats[name]


def test_cluster_ledger_and_health(served):
    stats = served.cluster()
    assert stats["lending"] is True and stats["block_size"] == 16
    assert stats["placement"] == "reactive" and stats["placement_moves"] == 0
    assert [i["instance"] for i in stats["instances"]] == [0, 1]
    for inst in stats["instances"]:
        assert inst["free_blocks"] + inst["used_blocks"] + inst["lent_blocks"] \
            == inst["total_blocks"] == 48
        model = inst["step_model"]  # fitted from the engine's own steps
        assert model["records"] >= 0 and model["fitted"] == bool(model["weights_s"])
    health = httpx.get(f"{served.url}/health", timeout=60)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
