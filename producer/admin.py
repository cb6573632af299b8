"""The dead-letter stream for operators: list what could not run, and requeue a job once its cause is fixed."""
from __future__ import annotations

from typing import Any

import redis

from producer.defaults import Defaults
from producer.keys import Keys, validate_id


class DeadLetterError(LookupError):
    """A dead letter that does not exist or cannot be retried."""


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


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

    The failed result, the finished token stream and the dead letter go in the same MULTI/EXEC as the XADD,
    so a waiting client sees the rerun, not the old failure (and `done` of the old run cannot end a new tail).
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
    pipe = r.pipeline(transaction=True)
    if rid:
        validate_id(rid)  # keys are built only from validated ids, even from our own dead letters
        pipe.delete(keys.result(rid), keys.tokens(rid), keys.cancel(rid))
        pipe.set(keys.status(rid), "queued", ex=d.status_ttl_s)
    pipe.xadd(stream, {"job": job})
    pipe.xdel(keys.dead, dead_id)
    new_entry = pipe.execute()[-2]
    return _text(new_entry), stream
