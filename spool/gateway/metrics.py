"""The gateway's Prometheus metrics (one registry per app) and the ASGI middleware that counts requests.

Worker-side metrics (queue backlog, TTFT inside the worker, KV usage...) come from the workers' own
/metrics (docs/OPERATIONS.md); these say what the HTTP face sees.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Path prefixes that name an endpoint: ids inside paths must not become label values.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/files", "/v1/batches", "/health",
             "/metrics")


def endpoint_of(path: str) -> str:
    """The endpoint label of a request path ("other" for anything unknown)."""
    for prefix in ENDPOINTS:
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return "other"


class Metrics:
    """Counters, histograms and gauges of one gateway process."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("spool_gateway_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.duration = Histogram("spool_gateway_request_duration_seconds",
                                  "Time from request to the end of the response (streams included)",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("spool_gateway_requests_in_flight", "HTTP requests being answered", ["endpoint"],
                               registry=r)
        self.ttft = Histogram("spool_gateway_time_to_first_token_seconds",
                              "Streamed requests: time from the request to its first content chunk",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("spool_gateway_rejected", "Requests refused before enqueuing, by reason",
                                ["reason"], registry=r)
        self.disconnects = Counter("spool_gateway_client_disconnects",
                                   "Clients that left before their answer; their jobs were cancelled", registry=r)
        self.live_workers = Gauge("spool_gateway_live_workers", "Live workers seen in Redis", registry=r)
        self.backlog = Gauge("spool_gateway_queue_backlog", "Jobs queued or running per stream, as last read",
                             ["priority"], registry=r)
        self.batches_running = Gauge("spool_gateway_batches_running", "Batch runners in this process", registry=r)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (no buffering of streamed bodies): counts each HTTP request by endpoint and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self._by_endpoint: dict[str, tuple] = {}
        self._counters: dict[tuple[str, int], object] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint, start, status = endpoint_of(scope.get("path", "")), time.perf_counter(), [500]

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        gauge, duration = self._children(endpoint)
        gauge.inc()
        try:
            await self.app(scope, receive, send_counting)
        finally:
            gauge.dec()
            key = (endpoint, status[0])
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self.metrics.requests.labels(endpoint, str(status[0]))
            counter.inc()
            duration.observe(time.perf_counter() - start)

    def _children(self, endpoint: str):
        # labels() costs ~20 us a call: look each child up once.
        found = self._by_endpoint.get(endpoint)
        if found is None:
            found = self._by_endpoint[endpoint] = (self.metrics.in_flight.labels(endpoint),
                                                   self.metrics.duration.labels(endpoint))
        return found
