"""Bulk batches in OpenAI Batch format, from Python: run, submit (rq), follow, collect, cancel. See docs/BATCH.md.

    from spool.producer import batch
    info = batch.run("in.jsonl", "out.jsonl", errors="err.jsonl", batch_id="nightly-1")   # blocking
    bid, _ = batch.submit("in.jsonl", "out.jsonl")                                        # on an rq worker
    for snap in batch.follow(bid): print(snap.status, snap.to_dict()["request_counts"])
    for rec in batch.collect("out.jsonl", "err.jsonl"): ...
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import fields as dc_fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

from spool.producer.batch.files import iter_lines
from spool.producer.batch.runner import BatchBusy, BatchInvalid, BatchMismatch, BatchRunner, RunOptions
from spool.producer.batch.schedule import (
    DEFAULT_QUEUE, job_spec, list_schedules, run_batch_job, run_scheduled, schedule as _schedule,
    submit as _submit, unschedule as _unschedule, upgrade_jobs as _upgrade_jobs,
)
from spool.producer.batch.state import TERMINAL, BatchInfo, BatchStore
from spool.producer.client import Client
from spool.protocol.defaults import DEFAULT_PREFIX

PathLike = str | os.PathLike[str]


def _client(client: Client | None, redis_url: str | None, prefix: str) -> Client:
    return client if client is not None else Client(redis_url, prefix=prefix)


def options(**kw: Any) -> RunOptions:
    """RunOptions from keyword arguments (max_in_flight, skip_invalid, progress, ...)."""
    names = {f.name for f in dc_fields(RunOptions)}
    unknown = set(kw) - names
    if unknown:
        raise TypeError(f"unknown batch options {sorted(unknown)}; known: {sorted(names)}")
    return RunOptions(**kw)


def run(input: PathLike, output: PathLike, errors: PathLike | None = None, *, batch_id: str | None = None,
        client: Client | None = None, redis_url: str | None = None, prefix: str = DEFAULT_PREFIX,
        progress: str = "none", **opts: Any) -> BatchInfo:
    """Run (or resume) a batch in this process until it is final; raises BatchInvalid on a bad file."""
    c = _client(client, redis_url, prefix)
    return BatchRunner(c, input, output, errors, batch_id, options(progress=progress, **opts)).run()


def submit(input: PathLike, output: PathLike, errors: PathLike | None = None, *, batch_id: str | None = None,
           at: datetime | None = None, delay_s: float | None = None, queue: str = DEFAULT_QUEUE,
           job_timeout: int = 86_400, client: Client | None = None, redis_url: str | None = None,
           prefix: str = DEFAULT_PREFIX, **opts: Any) -> tuple[str, str]:
    """Enqueue the batch as an rq job (JSON serializer), now, at `at` or after `delay_s`; returns (batch id, rq id)."""
    c = _client(client, redis_url, prefix)
    if delay_s is not None:
        at = datetime.now(timezone.utc) + timedelta(seconds=delay_s)
    spec = job_spec(str(input), str(output), str(errors) if errors else None, batch_id=batch_id,
                    redis_url=redis_url, prefix=prefix, options=options(**{"progress": "plain", **opts}))
    return _submit(c, spec, at=at, queue=queue, job_timeout=job_timeout)


def schedule(name: str, input: PathLike, output: PathLike, errors: PathLike | None = None, *, cron: str,
             tz: str | None = None, run_now: bool = False, queue: str = DEFAULT_QUEUE, job_timeout: int = 86_400,
             client: Client | None = None, redis_url: str | None = None, prefix: str = DEFAULT_PREFIX,
             **opts: Any) -> dict:
    """Run the batch on a cron schedule through rq; OUT must hold {date}, {datetime} or {batch_id}."""
    c = _client(client, redis_url, prefix)
    spec = job_spec(str(input), str(output), str(errors) if errors else None, redis_url=redis_url, prefix=prefix,
                    options=options(**{"progress": "plain", **opts}))
    return _schedule(c, name, spec, cron, tz=tz, run_now=run_now, queue=queue, job_timeout=job_timeout)


def unschedule(name: str, *, client: Client | None = None, redis_url: str | None = None,
               prefix: str = DEFAULT_PREFIX) -> bool:
    """Remove a cron schedule and its pending occurrence."""
    return _unschedule(_client(client, redis_url, prefix), name)


def schedules(*, client: Client | None = None, redis_url: str | None = None,
              prefix: str = DEFAULT_PREFIX) -> list[dict]:
    """Every cron schedule."""
    return list_schedules(_client(client, redis_url, prefix))


def upgrade_jobs(*, queue: str = DEFAULT_QUEUE, client: Client | None = None, redis_url: str | None = None,
                 prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Point rq jobs queued by spool < 0.2 (function paths under the old top-level `producer`) at the current
    functions; returns the ids rewritten. Run once after upgrading, before the rq workers (docs/BATCH.md)."""
    return _upgrade_jobs(_client(client, redis_url, prefix).redis, queue)


def status(batch_id: str, *, client: Client | None = None, redis_url: str | None = None,
           prefix: str = DEFAULT_PREFIX) -> BatchInfo | None:
    """The batch's current state, or None if unknown."""
    c = _client(client, redis_url, prefix)
    return BatchStore(c.redis, c.keys).get(batch_id)


def cancel(batch_id: str, *, client: Client | None = None, redis_url: str | None = None,
           prefix: str = DEFAULT_PREFIX) -> str:
    """Cancel a batch; returns its status afterwards (cancelling while its runner winds down, or cancelled)."""
    c = _client(client, redis_url, prefix)
    return BatchStore(c.redis, c.keys).cancel(batch_id, c.ctx.defaults)


def list_batches(limit: int = 50, *, client: Client | None = None, redis_url: str | None = None,
                 prefix: str = DEFAULT_PREFIX) -> list[BatchInfo]:
    """The newest batches first."""
    c = _client(client, redis_url, prefix)
    return BatchStore(c.redis, c.keys).list(limit)


def follow(batch_id: str, *, interval_s: float = 1.0, timeout: float | None = None, client: Client | None = None,
           redis_url: str | None = None, prefix: str = DEFAULT_PREFIX) -> Iterator[BatchInfo]:
    """Yield the batch's state whenever it changes, until a final status; TimeoutError after `timeout` s."""
    c = _client(client, redis_url, prefix)
    store, last, end = BatchStore(c.redis, c.keys), None, None if timeout is None else time.monotonic() + timeout
    while True:
        info = store.get(batch_id)
        snap = None if info is None else (info.status, *(info.count(k) for k in ("total", "completed", "failed")))
        if info is not None and snap != last:
            last = snap
            yield info
        if info is not None and info.status in TERMINAL:
            return
        if end is not None and time.monotonic() > end:
            raise TimeoutError(f"batch {batch_id} not final within {timeout}s")
        time.sleep(interval_s)


def wait(batch_id: str, **kw: Any) -> BatchInfo:
    """Block until the batch is final (follow()'s arguments); returns its last state."""
    info = None
    for info in follow(batch_id, **kw):
        pass
    assert info is not None
    return info


def collect(output: PathLike, errors: PathLike | None = None) -> Iterator[dict]:
    """Stream every output record of OUT, then of ERR (if another file): one dict per line."""
    for path in dict.fromkeys(p for p in (Path(output), Path(errors) if errors else None) if p is not None):
        if path.exists():
            for _, raw in iter_lines(path):
                yield orjson.loads(raw)


__all__ = ["BatchBusy", "BatchInfo", "BatchInvalid", "BatchMismatch", "BatchRunner", "RunOptions", "cancel",
           "collect", "follow", "list_batches", "options", "run", "run_batch_job", "run_scheduled", "schedule",
           "schedules", "status", "submit", "unschedule", "upgrade_jobs", "wait"]
