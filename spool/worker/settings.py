"""Worker settings: one dataclass, defaults here, every field settable as SPOOL_<NAME> or a CLI flag."""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from spool.protocol.defaults import DEFAULT_PREFIX


def default_worker_name() -> str:
    """host-pid, reduced to the id charset so it can key Redis entries."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:80] or "worker"
    return f"{host}-{os.getpid()}"


@dataclass(slots=True)
class WorkerSettings:
    """How the worker talks to Redis and paces itself."""

    redis_url: str | None = None  # None: SPOOL_REDIS_URL, else the embedded local server
    prefix: str = DEFAULT_PREFIX
    job_shards: int = 1  # jobs streams per priority to read (spool.protocol.keys); at least the producers' number
    name: str = field(default_factory=default_worker_name)
    grace_period_s: float = 30.0  # on SIGTERM: time to finish in-flight requests before leaving them pending
    claim_idle_ms: int = 60_000  # a pending job idle this long belongs to a dead worker and is reclaimed
    max_deliveries: int = 3  # a job delivered more often than this is a suspect: it runs alone (quarantine)
    max_quarantine_deaths: int = 2  # deaths of workers while a suspect ran alone that make it a poison job
    tool_call_parser: str = "auto"  # auto (from the chat template) | hermes | llama3_json
    heartbeat_s: float = 2.0
    stream_interval_ms: int = 100  # a streamed job's deltas are written at most this often (0: every step)
    block_ms: int = 1_000  # longest blocking read while idle
    redis_timeout_s: float = 10.0  # a Redis reply later than this (beyond block_ms): the connection is dead
    step_timeout_s: float = 300.0  # an engine step running longer ends the process (spool.worker.watchdog); 0: off
    max_jobs: int | None = None  # exit after this many finished jobs (tests, one-shot runs)
    metrics_port: int | None = None  # serve Prometheus /metrics on this port (0: any free one); None: off
    metrics_host: str = "0.0.0.0"  # address the metrics server binds to
    log_format: str = "text"  # text | json (one JSON object per line)

    def validate(self) -> None:
        """Reject values that cannot work, naming the setting, before a model is loaded (ValueError)."""
        from spool.protocol.keys import Keys

        Keys(self.prefix, job_shards=self.job_shards)  # the prefix's charset, the shard count's range
        for name, positive in (("heartbeat_s", True), ("claim_idle_ms", True), ("redis_timeout_s", True),
                               ("block_ms", False), ("stream_interval_ms", False), ("grace_period_s", False),
                               ("step_timeout_s", False)):
            value = getattr(self, name)
            if not (value > 0 if positive else value >= 0):  # NaN fails too
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {'> 0' if positive else '>= 0'}, "
                                 f"got {value!r}")
