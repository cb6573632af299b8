"""Batch state in Redis: the `{prefix}batch:{id}` hash, its index, the runner's lock and its in-flight set.

Status moves validating -> in_progress -> finalizing -> completed, or to failed, or cancelling -> cancelled;
every move is a compare-and-set (one Lua call), so a cancel never races a runner's last transition.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from spool.protocol.commands import as_str, cancel_cmds, execute
from spool.protocol.defaults import Defaults
from spool.protocol.keys import Keys, validate_id

STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")
MAX_BATCH_ID = 96  # request ids are b-{batch id}-{24 hex}: this keeps them within the 128-character id rule
LOCK_TTL_MS = 15_000  # a runner refreshes its lock every heartbeat; a dead one frees the batch this fast
TMP_TTL_S = 86_400  # the temporary seen/written sets outlive a crashed run until the next one deletes them

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status') or ''
for i = 3, #ARGV do
  if ARGV[i] == cur then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    return 'OK'
  end
end
return cur
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_TAKEOVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def validate_batch_id(batch_id: str) -> str:
    """A batch id: 1..96 characters of A-Z a-z 0-9 . _ -"""
    validate_id(batch_id, "batch id")
    if len(batch_id) > MAX_BATCH_ID:
        raise ValueError(f"batch id is longer than {MAX_BATCH_ID} characters")
    return batch_id


@dataclass(slots=True)
class BatchInfo:
    """A snapshot of one batch's state hash."""

    id: str
    status: str
    fields: dict[str, str] = field(default_factory=dict)

    def count(self, name: str) -> int:
        """An integer field (total, completed, failed, invalid, tokens); 0 when unset."""
        return int(self.fields.get(name) or 0)

    @property
    def finished(self) -> bool:
        """True in a terminal status."""
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI batch object (it validates as openai.types.Batch): status, endpoint, files as ids,
        integer *_at timestamps, request_counts, errors; spool's own fields beside them."""
        f = self.fields
        out: dict[str, Any] = {
            "id": self.id, "object": "batch", "status": self.status,
            "endpoint": f.get("endpoint") or "/v1/chat/completions",
            "completion_window": "24h",  # spool never expires a batch; 24h is the only value OpenAI takes
            "input_file_id": f.get("input_file") or "",
            "output_file_id": f.get("output_file"), "error_file_id": f.get("error_file"),
            "created_at": int(float(f.get("created_at") or 0)),
            "request_counts": {k: self.count(k) for k in ("total", "completed", "failed")},
        }
        for k in ("input_file", "output_file", "error_file", "input_sha256", "runner", "rq_job_id", "last_error"):
            if f.get(k):
                out[k] = f[k]
        out["invalid_lines"], out["completion_tokens"] = self.count("invalid"), self.count("tokens")
        for k in (s + "_at" for s in STATUSES):
            if f.get(k):
                out[k] = int(float(f[k]))
        if f.get("heartbeat"):
            out["heartbeat"] = float(f["heartbeat"])
        if f.get("errors"):
            errors = orjson.loads(f["errors"])
            out["errors"] = {"object": "list", "data": [{k: e.get(k) for k in ("code", "line", "message")}
                                                        for e in errors.get("data", [])]}
        return out


class BatchStore:
    """Reads and writes the Redis state of batches under one key prefix."""

    def __init__(self, r: redis.Redis, keys: Keys):
        self.redis, self.keys = r, keys
        self._transition = r.register_script(_TRANSITION)
        self._refresh = r.register_script(_REFRESH)
        self._release = r.register_script(_RELEASE)
        self._takeover = r.register_script(_TAKEOVER)

    def key(self, batch_id: str) -> str:
        """The state hash of a batch."""
        return self.keys.batch(validate_batch_id(batch_id))

    def inflight_key(self, batch_id: str) -> str:
        """Set of request ids enqueued by the batch whose output line is not written yet."""
        return self.key(batch_id) + ":inflight"

    def seen_key(self, batch_id: str) -> str:
        """Set of custom_id hashes while validating (duplicate detection outside the process's memory)."""
        return self.key(batch_id) + ":seen"

    def written_key(self, batch_id: str) -> str:
        """Set of custom_id hashes already in the output files, rebuilt from them at every start."""
        return self.key(batch_id) + ":written"

    def lock_key(self, batch_id: str) -> str:
        """Held (with a TTL) by the one runner working on the batch."""
        return self.key(batch_id) + ":lock"

    @property
    def index_key(self) -> str:
        """Sorted set of batch ids by creation time."""
        return f"{self.keys.prefix}batches"

    def get(self, batch_id: str) -> BatchInfo | None:
        """The batch's state, or None if it does not exist."""
        raw = self.redis.hgetall(self.key(batch_id))
        if not raw:
            return None
        f = {as_str(k): as_str(v) for k, v in raw.items()}
        return BatchInfo(batch_id, f.get("status", ""), f)

    def create(self, batch_id: str, **fields: Any) -> BatchInfo:
        """Create the batch in status validating if it does not exist; returns its state either way."""
        now = time.time()
        key = self.key(batch_id)
        pipe = self.redis.pipeline(transaction=False)  # each write is idempotent; the index is another slot
        pipe.hsetnx(key, "status", "validating")
        pipe.hsetnx(key, "created_at", repr(now))
        pipe.hsetnx(key, "validating_at", repr(now))
        pipe.zadd(self.index_key, {batch_id: now}, nx=True)
        pipe.execute()
        if fields:
            self.update(batch_id, **fields)
        return self.get(batch_id)  # type: ignore[return-value]

    def update(self, batch_id: str, **fields: Any) -> None:
        """Set plain fields (counts, files, heartbeat...)."""
        self.redis.hset(self.key(batch_id), mapping={k: _enc(v) for k, v in fields.items()})

    def transition(self, batch_id: str, to: str, *, frm: tuple[str, ...]) -> str | None:
        """Move to status `to` if the current one is in `frm`; returns None on success, else the current status."""
        got = self._transition(keys=[self.key(batch_id)], args=[to, repr(time.time()), *frm])
        return None if as_str(got) == "OK" else as_str(got)

    def list(self, limit: int = 50) -> list[BatchInfo]:
        """The newest batches first."""
        ids = [as_str(x) for x in self.redis.zrevrange(self.index_key, 0, limit - 1)]
        return [b for b in (self.get(i) for i in ids) if b is not None]

    # -- the runner's lock ------------------------------------------------------------------------
    def acquire(self, batch_id: str, owner: str) -> bool:
        """Take the batch's lock; False if another live runner holds it."""
        return bool(self.redis.set(self.lock_key(batch_id), owner, nx=True, px=LOCK_TTL_MS))

    def take_over_dead(self, batch_id: str, owner: str) -> bool:
        """Take the lock from a holder that is a dead process on this host (a crashed runner); else False."""
        holder = self.redis.get(self.lock_key(batch_id))
        if holder is None:
            return self.acquire(batch_id, owner)
        host, _, rest = as_str(holder).partition(":")
        pid = rest.partition(":")[0]
        if host != socket.gethostname() or not pid.isdigit() or pid_alive(int(pid)):
            return False
        return bool(self._takeover(keys=[self.lock_key(batch_id)], args=[holder, owner, LOCK_TTL_MS]))

    def refresh(self, batch_id: str, owner: str) -> bool:
        """Extend our lock; False if we lost it (expired and taken by someone else)."""
        return bool(self._refresh(keys=[self.lock_key(batch_id)], args=[owner, LOCK_TTL_MS]))

    def release(self, batch_id: str, owner: str) -> None:
        """Drop our lock."""
        self._release(keys=[self.lock_key(batch_id)], args=[owner])

    def runner_alive(self, batch_id: str) -> bool:
        """True while some runner holds the lock."""
        return bool(self.redis.exists(self.lock_key(batch_id)))

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self, batch_id: str, defaults: Defaults) -> str:
        """Ask for a cancel; with no live runner, cancel the batch's queued jobs here. Returns the new status."""
        if self.get(batch_id) is None:
            raise KeyError(f"no batch {batch_id!r}")
        current = self.transition(batch_id, "cancelling", frm=("validating", "in_progress", "finalizing"))
        if current is not None and current != "cancelling":
            return current  # already terminal: nothing to cancel
        if self.runner_alive(batch_id):
            return "cancelling"  # the runner sees it within a heartbeat and winds down itself
        rids = [as_str(x) for x in self.redis.smembers(self.inflight_key(batch_id))]
        cmds = [c for rid in rids for c in cancel_cmds(self.keys, defaults, rid)]
        execute(self.redis, [*cmds, ("delete", (self.inflight_key(batch_id),), {})])
        self.transition(batch_id, "cancelled", frm=("cancelling",))
        return "cancelled"


def pid_alive(pid: int) -> bool:
    """True while a process of this id exists on this host (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _enc(v: Any) -> str | bytes:
    if isinstance(v, (dict, list)):
        return orjson.dumps(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)
