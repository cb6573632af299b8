"""Batches as rq jobs, JSON-serialized (never pickle): now, at a time, or on a cron schedule for nightly runs.

rq 3.0's own `rq cron` scheduler enqueues with rq's default (pickle) serializer and has no way to choose
another, so cron schedules are kept here instead: each occurrence is an ordinary `enqueue_at` job that, when
an `rq worker --with-scheduler` runs it, first schedules the next occurrence (found with croniter, under a
unique job id so it exists once) and then runs its batch. The schedule's spec lives in Redis; replacing or
removing it retires the chain.
"""
from __future__ import annotations

import re
import time
import uuid
import zlib
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import redis
from croniter import croniter
from rq import Queue, get_current_job
from rq.exceptions import DeserializationError, DuplicateJobError, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from spool.producer.batch.runner import BatchRunner, RunOptions
from spool.producer.batch.state import BatchStore, validate_batch_id
from spool.producer.client import Client
from spool.protocol.defaults import DEFAULT_PREFIX

DEFAULT_QUEUE = "spool-batch"
DEFAULT_JOB_TIMEOUT_S = 86_400  # rq's default (180 s) would kill any real batch
RESULT_TTL_S = 7 * 86_400
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,60}")  # rq job ids allow no '.'; name + date must fit a batch id
PLACEHOLDERS = ("{batch_id}", "{name}", "{date}", "{datetime}")


def rq_queue(connection: redis.Redis, name: str = DEFAULT_QUEUE) -> Queue:
    """The rq queue of batch jobs, always with the JSON serializer."""
    return Queue(name, connection=connection, serializer=JSONSerializer)


def job_spec(input_path: str, output_path: str, errors_path: str | None = None, *, batch_id: str | None = None,
             redis_url: str | None = None, prefix: str = DEFAULT_PREFIX, options: RunOptions | None = None) -> dict:
    """The plain-JSON arguments of run_batch_job; paths made absolute (rq workers run elsewhere)."""
    opts = asdict(options or RunOptions(progress="plain"))
    return {"input": str(Path(input_path).resolve()), "output": str(Path(output_path).resolve()),
            "errors": str(Path(errors_path).resolve()) if errors_path else None, "batch_id": batch_id,
            "redis_url": redis_url, "prefix": prefix, "options": opts}


def run_batch_job(spec: dict) -> dict:
    """rq entry point: run one batch from a job_spec; returns the final batch object."""
    client = _job_client(spec.get("redis_url"), spec.get("prefix", DEFAULT_PREFIX))
    try:
        runner = BatchRunner(client, spec["input"], spec["output"], spec.get("errors"), spec.get("batch_id"),
                             RunOptions(**spec.get("options") or {}))
        return runner.run().to_dict()
    finally:
        client.close()


def submit(client: Client, spec: dict, *, at: datetime | None = None, queue: str = DEFAULT_QUEUE,
           job_timeout: int = DEFAULT_JOB_TIMEOUT_S) -> tuple[str, str]:
    """Enqueue a batch on rq (now, or at `at`); returns (batch id, rq job id). The batch exists at once."""
    spec = dict(spec, batch_id=validate_batch_id(spec.get("batch_id") or "batch_" + uuid.uuid4().hex[:16]))
    store = BatchStore(client.redis, client.keys)
    # The batch exists before its job does, so `status` / `follow` / `cancel` work from the moment we return.
    store.create(spec["batch_id"], input_file=spec["input"], output_file=spec["output"],
                 error_file=spec["errors"] or spec["output"])
    q = rq_queue(client.redis, queue)
    kw = {"job_timeout": job_timeout, "result_ttl": RESULT_TTL_S, "description": f"spool batch {spec['batch_id']}"}
    job = q.enqueue_at(at, run_batch_job, spec, **kw) if at is not None else q.enqueue(run_batch_job, spec, **kw)
    store.update(spec["batch_id"], rq_job_id=job.id)
    return spec["batch_id"], job.id


# -- cron schedules ---------------------------------------------------------------------------------
def schedules_key(prefix: str) -> str:
    """Hash of schedule name -> its JSON entry."""
    return f"{prefix}batch-schedules"


def next_fire(cron: str, tz: str | None, after: float) -> datetime:
    """The first cron time strictly after `after` (epoch s), in `tz` (default: this machine's local time)."""
    zone = ZoneInfo(tz) if tz else None
    base = datetime.fromtimestamp(after, zone) if zone else datetime.fromtimestamp(after).astimezone()
    return croniter(cron, base).get_next(datetime)


def schedule(client: Client, name: str, spec: dict, cron: str, *, tz: str | None = None, run_now: bool = False,
             queue: str = DEFAULT_QUEUE, job_timeout: int = DEFAULT_JOB_TIMEOUT_S) -> dict:
    """Create or replace the cron schedule `name`; returns its entry (with next_run)."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError("schedule name: 1..60 characters of A-Z a-z 0-9 _ -")
    if not croniter.is_valid(cron):
        raise ValueError(f"invalid cron expression {cron!r}")
    if tz:
        ZoneInfo(tz)  # raises for an unknown zone now, not at 2 a.m.
    for path in (spec["output"], spec.get("errors")):
        if path and not any(p in path for p in PLACEHOLDERS):
            raise ValueError(f"{path}: every run needs its own file; put one of {', '.join(PLACEHOLDERS)} in it")
    r, key = client.redis, schedules_key(client.keys.prefix)
    entry = {"name": name, "cron": cron, "tz": tz, "queue": queue, "job_timeout": job_timeout, "spec": spec,
             "version": uuid.uuid4().hex, "created_at": time.time(), "prefix": client.keys.prefix}
    old = r.hget(key, name)
    if old:
        _retire(r, orjson.loads(old))
    when = next_fire(cron, tz, time.time())
    entry["next_job_id"] = _schedule_occurrence(r, entry, when)
    entry["next_run"] = when.isoformat()
    r.hset(key, name, orjson.dumps(entry))
    if run_now:
        rq_queue(r, queue).enqueue(run_scheduled, name, entry["version"], time.time(), client.keys.prefix,
                                   job_timeout=job_timeout, result_ttl=RESULT_TTL_S,
                                   description=f"spool batch schedule {name} (run now)")
    return entry


def unschedule(client: Client, name: str) -> bool:
    """Remove a schedule and its pending occurrence; False if there was none."""
    r, key = client.redis, schedules_key(client.keys.prefix)
    old = r.hget(key, name)
    if not old:
        return False
    _retire(r, orjson.loads(old))
    r.hdel(key, name)
    return True


def list_schedules(client: Client) -> list[dict]:
    """Every schedule entry, by name."""
    raw = client.redis.hgetall(schedules_key(client.keys.prefix))
    return [orjson.loads(v) for _, v in sorted(raw.items())]


def run_scheduled(name: str, version: str, fire_ts: float, prefix: str = DEFAULT_PREFIX) -> dict:
    """rq entry point of one occurrence: schedule the next one, then run this one's batch."""
    r = get_current_job().connection  # type: ignore[union-attr]
    key = schedules_key(prefix)
    raw = r.hget(key, name)
    entry = orjson.loads(raw) if raw else None
    if entry is None or entry["version"] != version:
        return {"skipped": f"schedule {name!r} was removed or replaced"}
    # Next occurrence first: a crash of this run must not end the schedule.
    when = next_fire(entry["cron"], entry["tz"], max(time.time(), fire_ts))
    job_id = _schedule_occurrence(r, entry, when)
    fired = datetime.fromtimestamp(fire_ts, ZoneInfo(entry["tz"]) if entry["tz"] else None)
    batch_id = f"{name}-{fired:%Y%m%d-%H%M}"
    entry.update(next_job_id=job_id, next_run=when.isoformat(), last_run=fire_ts, last_batch_id=batch_id)
    r.hset(key, name, orjson.dumps(entry))
    values = {"{batch_id}": batch_id, "{name}": name, "{date}": f"{fired:%Y-%m-%d}",
              "{datetime}": f"{fired:%Y%m%d-%H%M}"}
    spec = dict(entry["spec"], batch_id=batch_id, output=_fill(entry["spec"]["output"], values),
                errors=_fill(entry["spec"].get("errors"), values))
    return run_batch_job(spec)


def _schedule_occurrence(r: redis.Redis, entry: dict, when: datetime) -> str:
    job_id = f"spool-sched-{entry['name']}-{int(when.timestamp())}"
    try:
        rq_queue(r, entry["queue"]).enqueue_at(
            when, run_scheduled, entry["name"], entry["version"], when.timestamp(), entry["prefix"],
            job_id=job_id, unique=True, job_timeout=entry["job_timeout"], result_ttl=RESULT_TTL_S,
            description=f"spool batch schedule {entry['name']}")
    except DuplicateJobError:
        pass  # already scheduled (by `schedule --now`, a retry, or a concurrent run): keep that one
    return job_id


def _retire(r: redis.Redis, entry: dict) -> None:
    job_id = entry.get("next_job_id")
    if job_id:
        rq_queue(r, entry["queue"]).scheduled_job_registry.remove(job_id, delete_job=True)


def _fill(template: str | None, values: dict[str, str]) -> str | None:
    if template is None:
        return None
    for k, v in values.items():
        template = template.replace(k, v)
    return template


def _job_client(redis_url: str | None, prefix: str) -> Client:
    if redis_url:
        return Client(redis_url, prefix=prefix)
    job = get_current_job()
    if job is None:
        return Client(None, prefix=prefix)
    # Same server as the rq queue, own pool: the batch must not share rq's connection state.
    pool = job.connection.connection_pool
    return Client(prefix=prefix, connection=redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **pool.connection_kwargs)))


# -- jobs queued by an older spool ---------------------------------------------------------------------
# rq stores a job's function as its dotted path. spool before 0.2 installed its packages at the top level
# (`producer`, ...), and 0.1.0's first layout named the module producer.batch_schedule; those paths no longer
# import, so a job queued under them (a pending cron occurrence above all) would fail in the rq worker.
LEGACY_FUNCTIONS = {f"{old}.{fn}": f"{__name__}.{fn}"
                    for old in ("producer.batch.schedule", "producer.batch_schedule")
                    for fn in ("run_batch_job", "run_scheduled")}


def upgrade_jobs(connection: redis.Redis, queue: str = DEFAULT_QUEUE) -> list[str]:
    """Point the jobs of `queue` that an older spool queued (waiting, scheduled, deferred or failed, so that
    `rq requeue` works on them too) at the current functions; returns the ids rewritten. Running it again
    rewrites nothing; jobs of other functions or serializers are left alone."""
    q = rq_queue(connection, queue)
    registries = (q.scheduled_job_registry, q.deferred_job_registry, q.failed_job_registry)
    ids = dict.fromkeys([*q.get_job_ids(), *(i for reg in registries for i in reg.get_job_ids())])
    rewritten = []
    for job_id in ids:
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
            new = LEGACY_FUNCTIONS.get(job.func_name)
        except (NoSuchJobError, DeserializationError):
            continue  # gone meanwhile, or not one of ours (another serializer)
        if new is None:
            continue
        # rq keeps (function, instance, args, kwargs) serialized and zlib-compressed in the job hash's `data`.
        data = JSONSerializer.dumps((new, None, job.args, job.kwargs))
        connection.hset(job.key, "data", zlib.compress(data))
        rewritten.append(job_id)
    return rewritten


__all__ = ["DEFAULT_QUEUE", "LEGACY_FUNCTIONS", "job_spec", "list_schedules", "next_fire", "rq_queue",
           "run_batch_job", "run_scheduled", "schedule", "submit", "unschedule", "upgrade_jobs"]
