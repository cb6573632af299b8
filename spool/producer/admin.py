"""Admin verbs for operators: the deployment's status, and the dead letters (list them, requeue one)."""
from __future__ import annotations

from typing import Any

import orjson
import redis

from spool.protocol.commands import as_str, queue_backlog
from spool.protocol.defaults import Defaults
from spool.protocol.keys import Keys, validate_id
from spool.protocol.scripts import digest


class DeadLetterError(LookupError):
    """A dead letter that does not exist or cannot be retried."""


def _text(v: Any) -> str:
    return as_str(v, errors="replace")


def live_workers(r: redis.Redis, keys: Keys) -> list[str]:
    """Names of the workers whose heartbeat is current (the workers set keeps a dead worker's name a while)."""
    names = sorted(_text(m) for m in r.smembers(keys.workers))
    if not names:
        return []
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.exists(keys.worker(name))  # the heartbeat hash expires SPOOL_WORKER_TTL_S after the last beat
    return [name for name, alive in zip(names, pipe.execute()) if alive]


def deployment_status(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Streams (length, backlog, pending per consumer), live workers with their heartbeat, the dead-letter count."""
    out: dict[str, Any] = {"streams": {}, "workers": {}}
    backlog = queue_backlog(r, keys.all_jobs, keys.group)
    for stream in keys.all_jobs:
        info: dict[str, Any] = {"length": r.xlen(stream), "backlog": backlog[stream], "pending": {}}
        try:
            summary = r.xpending(stream, keys.group)
            info["pending"] = {_text(c["name"]): c["pending"] for c in summary.get("consumers", [])}
        except redis.ResponseError:  # the group does not exist until a worker starts
            pass
        out["streams"][stream] = info
    for name in sorted(_text(m) for m in r.smembers(keys.workers)):
        heartbeat = r.hgetall(keys.worker(name))
        if heartbeat:
            out["workers"][name] = {_text(k): orjson.loads(v) for k, v in heartbeat.items()}
    out["dead_letters"] = r.xlen(keys.dead)
    return out


def list_dead(r: redis.Redis, keys: Keys, count: int = 100, start: str = "-") -> list[dict[str, str]]:
    """Dead letters, oldest first: their fields (stream, entry_id, reason, deliveries, id, at, job) and dead_id."""
    rows = []
    for eid, fields in r.xrange(keys.dead, min=start, count=count):
        row = {_text(k): _text(v) for k, v in fields.items()}
        row["dead_id"] = _text(eid)
        rows.append(row)
    return rows


def retry_dead(r: redis.Redis, keys: Keys, dead_id: str, defaults: Defaults | None = None) -> tuple[str, str]:
    """Requeue the job of one dead letter on its original stream; returns (new entry id, stream).

    The failed result and the finished token stream are deleted before the XADD, so a waiting client sees the
    rerun, not the old failure (and `done` of the old run cannot end a new tail); the dead letter goes last.
    """
    d = defaults or Defaults.from_env()
    try:
        entries = r.xrange(keys.dead, min=dead_id, max=dead_id)
    except redis.ResponseError as e:
        raise DeadLetterError(f"bad dead letter id {dead_id!r}: {e}") from None
    if not entries:
        raise DeadLetterError(f"no dead letter {dead_id}")
    fields = {_text(k): v for k, v in entries[0][1].items()}
    job = fields.get("job")
    if job is None:
        raise DeadLetterError("that dead letter has no job document to retry")
    stream = _text(fields.get("stream", keys.jobs()))
    if stream not in keys.all_jobs:
        raise DeadLetterError(f"dead letter names {stream!r}, which is not a jobs stream of this deployment")
    rid = _text(fields.get("id", ""))
    if rid:
        validate_id(rid)  # keys are built only from validated ids, even from our own dead letters
        held = r.get(keys.digest(rid))
        if held is not None and _text(held) != digest(job):
            # A duplicate_id dead letter: the id's result and stream belong to another job; leave them be.
            raise DeadLetterError(f"id {rid!r} is held by another job document; "
                                  "requeue this job under a new id instead")
        # The request's keys share one hash slot: reset them in one MULTI, then XADD (the jobs stream's slot),
        # then drop the dead letter (its own slot). Stopped in between, the dead letter is still there to retry.
        pipe = r.pipeline(transaction=True)
        pipe.delete(keys.result(rid), keys.tokens(rid), keys.cancel(rid), keys.quarantine(rid))
        pipe.set(keys.digest(rid), digest(job), ex=d.result_ttl_s)
        pipe.set(keys.status(rid), "queued", ex=d.status_ttl_s)
        pipe.execute()
    new_entry = r.xadd(stream, {"job": job})
    r.xdel(keys.dead, dead_id)
    return _text(new_entry), stream
