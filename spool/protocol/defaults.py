"""Every tunable default and limit of the wire contract in one place, overridable by SPOOL_* variables."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from spool.protocol.env import env_overrides

DEFAULT_PREFIX = "spool:"
MAX_ID_LEN = 128

# Hard bounds mirrored from spool/engine/sampling_params.py (protocol must not import engine); a Job that
# validates always yields a valid SamplingParams. tests/test_protocol.py checks they stay in step.
ENGINE_MAX_LOGPROBS = 20
ENGINE_MAX_N = 64
ENGINE_MAX_STOP = 64
MAX_STOP_STRING_CHARS = 256
MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Defaults:
    """TTLs, stream caps and client timings shared by producers and workers."""

    result_ttl_s: int = 86_400  # a day: long enough for nightly batches to be collected the next morning
    tokens_ttl_s: int = 3_600  # a live stream's TTL while its job runs (refreshed every min(10 s, TTL/4))
    stream_done_ttl_s: int = 300  # a streamed job's token stream after `done`: late tailers, then gone
    done_marker_ttl_s: int = 10  # a non-streamed job's stream holds only `done`: it wakes waiters, no more
    tokens_maxlen: int = 10_000  # approximate MAXLEN of a token stream (deltas are coalesced per stream interval)
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
    job_shards: int = 1  # jobs streams per priority (spool.protocol.keys); workers must read at least as many
    durable_timeout_ms: int = 1_000  # durable enqueues: how long WAIT waits for a replica's acknowledgement

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Defaults:
        """Defaults with SPOOL_<FIELD> (e.g. SPOOL_RESULT_TTL_S) overrides applied."""
        return env_overrides(cls(), env)


@dataclass(frozen=True, slots=True)
class Limits:
    """Deployment policy on top of the schema's hard bounds; override with SPOOL_<FIELD> (e.g. SPOOL_MAX_N)."""

    max_job_bytes: int = 1 << 20
    max_prompt_chars: int = 262_144  # prompt, or the sum of all message contents
    max_prompt_tokens: int = 131_072  # length of prompt_token_ids
    max_tokens: int = 8_192
    max_n: int = 16
    max_stop: int = 16  # cap on stop strings and on stop_token_ids, each
    max_id: int = MAX_ID_LEN

    def __post_init__(self) -> None:
        hard = {"max_n": ENGINE_MAX_N, "max_stop": ENGINE_MAX_STOP, "max_id": MAX_ID_LEN}  # only tighten these
        for name in self.__slots__:
            if not 1 <= getattr(self, name) <= hard.get(name, 1 << 30):
                raise ValueError(f"Limits.{name} must be in 1..{hard.get(name, 1 << 30)}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        """Limits with SPOOL_MAX_* environment overrides applied."""
        return env_overrides(cls(), env)


DEFAULT_LIMITS = Limits()
