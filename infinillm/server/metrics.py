"""Prometheus metrics of the server, on a private CollectorRegistry (one per app).

Request-level series (requests by endpoint and status, time to first token, time per output
token, token counts) are recorded by the app as requests run. Cluster-level series are read at
scrape time from `cluster_stats()`, so they are never stale and cost nothing between scrapes:
per instance free / used / lent / borrowed blocks and running / waiting requests (label
`instance`), the debts between instances, and the cluster's counters (remote micro-attention
calls and bytes, migrations, preemptions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

# Per-instance block gauges: (metric suffix, cluster_stats key, help).
_BLOCK_GAUGES = (
    ("total_blocks", "total_blocks", "rBlocks in the instance's pool"),
    ("free_blocks", "free_blocks", "free rBlocks in the instance's pool"),
    ("used_blocks", "used_blocks", "rBlocks of the pool used by the instance's own requests"),
    ("lent_blocks", "lent_blocks", "rBlocks of the pool lent to other instances"),
    ("borrowed_blocks", "borrowed_blocks", "rBlocks the instance holds in other pools"),
    ("cached_blocks", "cached_blocks", "rBlocks of the pool in the prefix cache (in use or not)"),
    ("evictable_blocks", "evictable_blocks",
     "cached rBlocks no request uses (counted as free; evicted when memory is needed)"),
    ("num_requests_running", "running", "requests running on the instance"),
    ("num_requests_waiting", "waiting", "requests waiting on the instance"),
)
# Cluster counters: (metric name without _total, cluster_stats key, help).
_CLUSTER_COUNTERS = (
    ("remote_attention_calls", "remote_attention_calls",
     "micro-attention calls run by an instance for blocks it holds for another"),
    ("remote_bytes", "remote_bytes", "bytes sent between instances (queries, partials, KV)"),
    ("migrations", "migrations", "rBlocks moved between instances (recall)"),
    ("preemptions", "preemptions", "requests preempted for recompute"),
    ("prefix_cache_queries", "prefix_cache_queries",
     "prompt tokens looked up in the prefix cache when requests start"),
    ("prefix_cache_hits", "prefix_cache_hits",
     "prompt tokens found in the prefix cache (not computed); hit rate = hits / queries"),
)


class ClusterCollector(Collector):
    """Reads `stats()` (ClusterEngine.cluster_stats's shape) at every scrape."""

    def __init__(self, stats: Callable[[], dict], prefix: str = "infinillm") -> None:
        self.stats = stats
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        p = self.prefix
        for suffix, key, doc in _BLOCK_GAUGES:
            gauge = GaugeMetricFamily(f"{p}_{suffix}", doc, labels=["instance"])
            for inst in stats["instances"]:
                gauge.add_metric([str(inst["instance"])], inst[key])
            yield gauge
        yield _sum_gauge(f"{p}_num_requests_running_all", "requests running, all instances",
                         sum(i["running"] for i in stats["instances"]))
        yield _sum_gauge(f"{p}_num_requests_waiting_all", "requests waiting, all instances",
                         sum(i["waiting"] for i in stats["instances"]))
        debts = GaugeMetricFamily(f"{p}_debt_blocks", "rBlocks a debtor holds in a creditor",
                                  labels=["debtor", "creditor"])
        for d in stats["debts"]:
            debts.add_metric([str(d["debtor"]), str(d["creditor"])], d["blocks"])
        yield debts
        for name, key, doc in _CLUSTER_COUNTERS:
            yield CounterMetricFamily(f"{p}_{name}", doc, value=stats.get(key, 0))


def _sum_gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The series the app records, and `render()` for GET /metrics."""

    def __init__(self, cluster_stats: Callable[[], dict], prefix: str = "infinillm") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{prefix}_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds",
                              "from a request's arrival to its first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{prefix}_time_per_output_token_seconds",
                              "mean time between output tokens of a finished sequence",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens", "prompt tokens of accepted "
                                     "requests", registry=r)
        self.generation_tokens = Counter(f"{prefix}_generation_tokens", "generated tokens",
                                         registry=r)
        r.register(ClusterCollector(cluster_stats, prefix))

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        """The text exposition; reads cluster_stats (takes the engine lock: call off-loop)."""
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: counts every HTTP request by endpoint (known paths, else "other") and
    response status. Pure ASGI (not BaseHTTPMiddleware), so streams and disconnects pass
    through untouched."""

    def __init__(self, app, metrics: ServerMetrics, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes the app becomes a 500 further out

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.count_request(endpoint, status)
