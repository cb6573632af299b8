"""Prometheus metrics of one worker process: vLLM's names under `spool_`, served on --metrics-port.

Cost: nothing here runs per token. What the engine and the loop count anyway (generated tokens, preemptions,
prefix-cache queries and hits, duplicate finals, Redis failures) and the gauges (running, waiting, KV usage,
queue backlog) are read when Prometheus scrapes, on the HTTP server's thread. The loop itself observes one
histogram per engine step and four per finished job. Each worker has its own registry, so several workers
in one process (tests, benchmarks) never share series; each process serves its own port.
"""
from __future__ import annotations

import logging
import typing
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from spool.protocol import PRIORITIES, Result
from spool.protocol.commands import queue_backlog
from spool.protocol.connection import TRANSIENT_ERRORS
from spool.protocol.results import Status
from spool.worker.outbox import Backoff

log = logging.getLogger(__name__)

STATUSES: tuple[str, ...] = typing.get_args(Status)
# vLLM's buckets, with the queue and end-to-end ones stretched to a day: a bulk job may wait all night.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 3600.0, 7680.0, 21600.0, 86400.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.16, 0.32,
                0.64, 1.28, 2.56)
BACKLOG_TIMEOUT_S = 1.0  # a scrape must not hang on a Redis that does not answer: the backlog is left out


class MetricsServerError(OSError):
    """The metrics port could not be bound (in use, or not ours to take)."""


class CountingBackoff(Backoff):
    """Backoff that also counts failures and recoveries (Redis answered again), for the metrics."""

    __slots__ = ("failures", "recoveries")

    def __init__(self, cap_s: float = 5.0, first_s: float = 0.1):
        super().__init__(cap_s, first_s)
        self.failures = 0
        self.recoveries = 0

    def fail(self) -> float:
        """Record a failure (counted); returns the pause before the next try."""
        self.failures += 1
        return super().fail()

    def ok(self) -> None:
        """Record a success; the first one after failures counts as a recovery."""
        if self.failing:
            self.recoveries += 1
        super().ok()


def backlog_client(client: redis.Redis) -> redis.Redis:
    """A client for the same server with short timeouts and its own pool: scrapes never wait on the loop's."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs, socket_timeout=BACKLOG_TIMEOUT_S, socket_connect_timeout=BACKLOG_TIMEOUT_S)
    kwargs["retry"] = None  # at most one quick retry (redis-py's default for retry_on_error): the next scrape retries
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


class _ScrapeTimeCollector(Collector):
    """Gauges and counters read from the engine and the loop when Prometheus scrapes."""

    def __init__(self, worker: Any):
        self.worker = worker
        self.redis = backlog_client(worker.redis)

    def collect(self) -> Iterator[Any]:
        w, engine = self.worker, self.worker.engine
        scheduler, cache = engine.scheduler, engine.block_manager.stats
        backoffs = (w.gate, w.outbox.backoff)
        yield GaugeMetricFamily("spool_running_requests", "Sequences in the engine's running batch.",
                                value=len(scheduler.running))
        yield GaugeMetricFamily("spool_waiting_requests", "Sequences admitted to the engine, waiting to run.",
                                value=len(scheduler.waiting))
        yield GaugeMetricFamily("spool_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).",
                                value=engine.kv_cache_usage())
        counters = {
            "spool_generation_tokens": ("Tokens generated.", engine.stats.generation_tokens),
            "spool_preemptions": ("Sequences preempted for KV blocks (recomputed later).", scheduler.num_preemptions),
            "spool_prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", cache.queries),
            "spool_prefix_cache_hits": ("Prompt tokens served from the prefix cache.", cache.hits),
            "spool_duplicate_finals": ("Final results dropped because the job already had one.",
                                       w.finisher.finals_lost),
            "spool_redis_errors": ("Redis calls of the loop that failed (reads, writes, checks).",
                                   sum(getattr(b, "failures", 0) for b in backoffs)),
            "spool_redis_reconnects": ("Times Redis answered the loop again after failures.",
                                       sum(getattr(b, "recoveries", 0) for b in backoffs)),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        backlog = GaugeMetricFamily("spool_queue_backlog",
                                    "Jobs queued or running per jobs stream (consumer-group lag + pending).",
                                    labels=["stream"])
        try:
            for stream, value in queue_backlog(self.redis, w.keys.all_jobs, w.keys.group).items():
                backlog.add_metric([stream], value)
        except (*TRANSIENT_ERRORS, redis.ResponseError) as e:
            log.debug("metrics: queue backlog unavailable: %s", e)
        yield backlog


class WorkerMetrics:
    """The metrics of one Worker: per-job and per-step observations, plus the scrape-time collector.

    `worker` is the spool.worker.loop.Worker (typed Any: the loop imports this module, not the other way round).
    """

    def __init__(self, worker: Any):
        self.registry = CollectorRegistry(auto_describe=False)  # else registering would scrape (and call Redis) now
        reg = self.registry
        self.jobs_finished = Counter("spool_jobs_finished", "Jobs that reached a final status.",
                                     ["status", "priority"], registry=reg)
        self.prompt_tokens = Counter("spool_prompt_tokens", "Prompt tokens of finished jobs.", registry=reg)
        self.dead_letters = Counter("spool_dead_letters", "Entries moved to the dead-letter stream.", registry=reg)
        self.reclaimed = Counter("spool_reclaimed_jobs",
                                 "Jobs taken over from stopped or dead workers (or this name's own at start).",
                                 registry=reg)
        # Per-job histograms carry the priority: interactive latency is what an SLO is about, bulk's is not.
        self.ttft = Histogram("spool_time_to_first_token_seconds", "Enqueue to first generated token.",
                              ["priority"], buckets=TTFT_BUCKETS, registry=reg)
        self.tpot = Histogram("spool_time_per_output_token_seconds",
                              "Mean time between output tokens of a finished job (after its first).",
                              ["priority"], buckets=TPOT_BUCKETS, registry=reg)
        self.e2e = Histogram("spool_e2e_request_latency_seconds", "Enqueue to final result.",
                             ["priority"], buckets=LATENCY_BUCKETS, registry=reg)
        self.queue_wait = Histogram("spool_queue_wait_seconds", "Enqueue to admission into the engine.",
                                    ["priority"], buckets=QUEUE_BUCKETS, registry=reg)
        self.step = Histogram("spool_step_duration_seconds",
                              "One loop tick with an engine step: launch, Redis I/O, collect.",
                              buckets=STEP_BUCKETS, registry=reg)
        # Children resolved once: .labels() on every finished job would cost a lock and a dict build.
        self._finished = {(s, p): self.jobs_finished.labels(s, p) for s in STATUSES for p in PRIORITIES}
        self._latency = {p: (self.queue_wait.labels(p), self.ttft.labels(p), self.tpot.labels(p), self.e2e.labels(p))
                         for p in PRIORITIES}
        self._priority = {s: worker.keys.priority_of(s) for s in worker.keys.all_jobs}  # every shard
        self.observe_step = self.step.observe
        reg.register(_ScrapeTimeCollector(worker))
        self._server: Any = None
        self.port: int | None = None

    # -- the loop's hooks -------------------------------------------------------------------------
    def on_final(self, result: Result, stream: str) -> None:
        """One job reached a final status (any way: completed, rejected, cancelled, expired, poison)."""
        priority = self._priority.get(stream, "unknown")
        child = self._finished.get((result.status, priority))
        (child or self.jobs_finished.labels(result.status, priority)).inc()
        usage, t = result.usage, result.timings
        if usage.prompt_tokens:
            self.prompt_tokens.inc(usage.prompt_tokens)
        if t.enqueued is None or priority not in self._latency:
            return
        queue_wait, ttft, tpot, e2e = self._latency[priority]
        if t.started is not None:
            queue_wait.observe(max(0.0, t.started - t.enqueued))
        if t.first_token is not None:
            ttft.observe(max(0.0, t.first_token - t.enqueued))
            per_choice = max((len(c.token_ids) for c in result.choices), default=0)
            if per_choice > 1 and t.finished is not None:
                tpot.observe(max(0.0, t.finished - t.first_token) / (per_choice - 1))
        if t.finished is not None:
            e2e.observe(max(0.0, t.finished - t.enqueued))

    def on_dead_letter(self) -> None:
        """An entry went to the dead-letter stream."""
        self.dead_letters.inc()

    def on_reclaimed(self, count: int) -> None:
        """Jobs taken over from other (or earlier) workers."""
        if count:
            self.reclaimed.inc(count)

    # -- serving ----------------------------------------------------------------------------------
    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on host:port (0: any free port) from a daemon thread; returns the port."""
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise MetricsServerError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        """Stop serving (a worker that leaves; a benchmark that runs the next worker on the same port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
