"""Redis key layout of the wire protocol; every key embeds only a validated id."""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.defaults import DEFAULT_PREFIX, MAX_ID_LEN
from protocol.priorities import DEFAULT_PRIORITY, PRIORITIES, validate_priority

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"  # also published in the JSON schema
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
# A prefix may carry ':' separators and '{...}' cluster hash tags, but nothing that would split a key.
_PREFIX_RE = re.compile(r"[A-Za-z0-9._:{}-]{0,64}")

GROUP = "workers"


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
    """A Keys method building '{prefix}{kind}:{id}' from a validated id."""
    def key(self: Keys, id: str) -> str:
        return f"{self.prefix}{kind}:{validate_id(id, what)}"

    key.__name__, key.__doc__ = kind, doc
    return key


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds every Redis key of one spool deployment (prefix default 'spool:')."""

    prefix: str = DEFAULT_PREFIX
    group: str = GROUP
    # One key each per deployment, built once from the prefix:
    cancels: str = field(init=False)  # stream of cancelled ids that workers follow (field 'id')
    dead: str = field(init=False)  # stream of jobs that could not run, with the reason
    stats: str = field(init=False)  # hash of deployment-wide counters (duplicate_finals: suppressed finals)
    workers: str = field(init=False)  # set of live worker names

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"invalid key prefix {self.prefix!r}: use up to 64 of A-Z a-z 0-9 . _ - : {{ }}")
        for name in ("cancels", "dead", "stats", "workers"):
            object.__setattr__(self, name, self.prefix + name)  # frozen: set once, here

    def jobs(self, priority: str = DEFAULT_PRIORITY) -> str:
        """The jobs stream of a priority: '{p}jobs' (interactive) or '{p}jobs:bulk'."""
        validate_priority(priority)
        # The interactive stream is the bare name so the simplest producer (XADD spool:jobs) gets it.
        return f"{self.prefix}jobs" if priority == DEFAULT_PRIORITY else f"{self.prefix}jobs:{priority}"

    @property
    def all_jobs(self) -> list[str]:
        """Every jobs stream, in the order workers should drain them."""
        return [self.jobs(p) for p in PRIORITIES]

    def priority_of(self, stream: str | bytes) -> str:
        """The priority whose jobs stream is `stream` (inverse of jobs())."""
        name = stream.decode() if isinstance(stream, bytes) else stream
        for p in PRIORITIES:
            if self.jobs(p) == name:
                return p
        raise ValueError(f"{name!r} is not a jobs stream under prefix {self.prefix!r}")

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
    def default_id(priority: str, entry_id: str | bytes) -> str:
        """Request id of a job sent without one: its stream entry id, prefixed for non-default streams."""
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        # Entry ids are unique per stream only; two streams can mint the same one in the same millisecond.
        return validate_id(eid if priority == DEFAULT_PRIORITY else f"{validate_priority(priority)}-{eid}")
