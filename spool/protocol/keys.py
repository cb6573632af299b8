"""Redis key layout of the wire protocol; every key embeds only a validated id.

One layout serves a single Redis node and a Redis Cluster: every command and every script touches keys of one
hash slot. A request's keys carry its id as a cluster hash tag (`spool:result:{id}`, `spool:tokens:{id}`...),
so the scripts that write a request's result, stream and status together stay on one slot; the deployment-wide
keys (cancels, dead, stats, workers) are written by commands of their own. Jobs streams can be sharded
(job_shards): producers pick a shard by the id's hash, workers read every shard.
"""
from __future__ import annotations

import re
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from spool.protocol.defaults import DEFAULT_PREFIX, MAX_ID_LEN
from spool.protocol.priorities import DEFAULT_PRIORITY, PRIORITIES, validate_priority

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"  # also published in the JSON schema
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
# A prefix may carry ':' separators and '{...}' cluster hash tags, but nothing that would split a key.
_PREFIX_RE = re.compile(r"[A-Za-z0-9._:{}-]{0,64}")

GROUP = "workers"
MAX_JOB_SHARDS = 1024


def validate_id(value: object, what: str = "id") -> str:
    """Return `value` if it is a valid request id (1..128 chars of [A-Za-z0-9._-]), else raise ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not _ID_RE.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ValueError(
            f"invalid {what} {shown!r}: use 1..{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ - "
            f"(no ':', '*', spaces or newlines)"
        )
    return value


def new_id() -> str:
    """A fresh random request id (uuid4 hex, 32 chars)."""
    return uuid.uuid4().hex


def _id_key(kind: str, doc: str, what: str = "id") -> Callable[[Keys, str], str]:
    """A Keys method building '{prefix}{kind}:{{id}}' from a validated id: the id is the key's cluster hash
    tag, so every key of one request lives in one slot."""
    def key(self: Keys, id: str) -> str:
        return f"{self.prefix}{kind}:{{{validate_id(id, what)}}}"

    key.__name__, key.__doc__ = kind, doc
    return key


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds every Redis key of one spool deployment (prefix default 'spool:')."""

    prefix: str = DEFAULT_PREFIX
    group: str = GROUP
    job_shards: int = 1  # jobs streams per priority; producers and workers must agree (workers may have more)
    # One key each per deployment, built once from the prefix:
    cancels: str = field(init=False)  # stream of cancelled ids that workers follow (field 'id')
    dead: str = field(init=False)  # stream of jobs that could not run, with the reason
    stats: str = field(init=False)  # hash of deployment-wide counters (duplicate_finals: suppressed finals)
    workers: str = field(init=False)  # set of live worker names
    _streams: dict[str, tuple[str, int]] = field(init=False, repr=False, compare=False)  # stream -> (priority, shard)

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"invalid key prefix {self.prefix!r}: use up to 64 of A-Z a-z 0-9 . _ - : {{ }}")
        if isinstance(self.job_shards, bool) or not isinstance(self.job_shards, int) \
                or not 1 <= self.job_shards <= MAX_JOB_SHARDS:
            raise ValueError(f"job_shards must be an integer in 1..{MAX_JOB_SHARDS}, got {self.job_shards!r}")
        for name in ("cancels", "dead", "stats", "workers"):
            object.__setattr__(self, name, self.prefix + name)  # frozen: set once, here
        streams = {self.jobs(p, s): (p, s) for p in PRIORITIES for s in range(self.job_shards)}
        object.__setattr__(self, "_streams", streams)

    def jobs(self, priority: str = DEFAULT_PRIORITY, shard: int = 0) -> str:
        """The jobs stream of a priority and shard: '{p}jobs' (interactive) or '{p}jobs:bulk' for shard 0,
        '{p}jobs:{tag}' / '{p}jobs:bulk:{tag}' for the others (both priorities of a shard share one slot)."""
        validate_priority(priority)
        # The interactive stream of shard 0 is the bare name so the simplest producer (XADD spool:jobs) gets it.
        base = f"{self.prefix}jobs" if priority == DEFAULT_PRIORITY else f"{self.prefix}jobs:{priority}"
        if shard == 0:
            return base
        if not 0 < shard < self.job_shards:
            raise ValueError(f"shard {shard} is out of range for job_shards={self.job_shards}")
        return f"{base}:{{{_shard_tag(self.prefix, shard, self.job_shards)}}}"

    def jobs_of(self, priority: str) -> list[str]:
        """Every shard's jobs stream of one priority."""
        return [self.jobs(priority, s) for s in range(self.job_shards)]

    @property
    def all_jobs(self) -> list[str]:
        """Every jobs stream, in the order workers should drain them (all interactive shards, then bulk)."""
        return list(self._streams)

    def shard_of(self, id: str) -> int:
        """The jobs shard a producer puts request `id` on (CRC-32 of the id: the same in every process)."""
        return zlib.crc32(validate_id(id).encode()) % self.job_shards

    def job_stream(self, id: str, priority: str = DEFAULT_PRIORITY) -> str:
        """The jobs stream a producer XADDs request `id` of `priority` to."""
        return self.jobs(priority, self.shard_of(id))

    def priority_of(self, stream: str | bytes) -> str:
        """The priority whose jobs stream is `stream` (inverse of jobs())."""
        return self._where(stream)[0]

    def shard_of_stream(self, stream: str | bytes) -> int:
        """The shard number of jobs stream `stream`."""
        return self._where(stream)[1]

    def _where(self, stream: str | bytes) -> tuple[str, int]:
        name = stream.decode() if isinstance(stream, bytes) else stream
        found = self._streams.get(name)
        if found is None:
            raise ValueError(f"{name!r} is not a jobs stream under prefix {self.prefix!r} "
                             f"with job_shards={self.job_shards}")
        return found

    # Per-request (and per-worker, per-batch) keys: '{prefix}{kind}:{id}', the id validated on the way in.
    result = _id_key("result", "String key holding the final Result JSON.")
    tokens = _id_key("tokens", "Stream of token events (delta/restart, then done) of one request.")
    status = _id_key("status", "String key 'queued' | 'running' while a job is not final.")
    cancel = _id_key("cancel", "String key whose presence cancels a request.")
    digest = _id_key("digest", "String key: SHA-1 of the job document that holds this id (idempotent enqueue).")
    quarantine = _id_key("quarantine", "Hash of a suspect job run alone: 'runner', and 'deaths' while alone.")
    worker = _id_key("worker", "Hash with one worker's heartbeat, model and load.", "worker name")
    batch = _id_key("batch", "Hash with one bulk batch's state and counts.", "batch id")

    @staticmethod
    def default_id(priority: str, entry_id: str | bytes, shard: int = 0) -> str:
        """Request id of a job sent without one: its stream entry id, prefixed for non-default streams
        (the priority, then 's<shard>' for shards other than 0)."""
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        # Entry ids are unique per stream only; two streams can mint the same one in the same millisecond.
        if shard:
            eid = f"s{int(shard)}-{eid}"
        return validate_id(eid if priority == DEFAULT_PRIORITY else f"{validate_priority(priority)}-{eid}")

    def default_id_of(self, stream: str | bytes, entry_id: str | bytes) -> str:
        """default_id for an entry of jobs stream `stream`."""
        priority, shard = self._where(stream)
        return self.default_id(priority, entry_id, shard)


def _shard_tag(prefix: str, shard: int, shards: int) -> str:
    """The hash tag of jobs shard `shard`: the first of '{shard}', '{shard}.1', ... whose slot lies in the
    shard's share of the slot range, so that an evenly split cluster (what `redis-cli --cluster create` makes)
    holds each shard on a different node as far as the node count allows. Deterministic: every process agrees."""
    if "{" in prefix:  # the prefix's own hash tag decides the slot of every key: nothing to spread
        return str(shard)
    low, high = shard * REDIS_CLUSTER_HASH_SLOTS // shards, (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
    for i in range(100_000):
        tag = str(shard) if i == 0 else f"{shard}.{i}"
        if low <= key_slot(tag.encode()) < high:
            return tag
    return str(shard)  # unreachable for shards <= MAX_JOB_SHARDS: each range holds >= 16 slots
