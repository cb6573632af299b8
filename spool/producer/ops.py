"""Client logic shared by Client and AsyncClient, written once as I/O-free generators.

Each verb is a generator that yields a `RoundTrip` of Redis commands and receives the list of replies, or
yields a TokenEvent for the caller. The sync and async clients only execute round trips, so encoding,
waiting and decoding rules cannot drift apart between the two.
"""
from __future__ import annotations

import math
import time
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from spool.producer.errors import RedisFullError
from spool.protocol import PROTOCOL_VERSION, JobError, Limits, Result, TokenEvent, parse_job
from spool.protocol.commands import (
    DUPLICATE_ID, XREAD_COUNT, Cmd, Flow, cancel_cmds, cmd, duplicate_id_message, enqueue_flow, xread_entries,
)
from spool.protocol.defaults import DEFAULT_PREFIX, Defaults
from spool.protocol.connection import is_cluster, sentinel_url_from_env
from spool.protocol.env import ENV_REDIS_URL, env_text
from spool.protocol.keys import Keys, new_id
from spool.protocol.priorities import DEFAULT_PRIORITY, validate_priority


@dataclass(slots=True)
class RoundTrip:
    """Commands for one round trip; transaction=True wraps them in MULTI/EXEC."""

    cmds: list[Cmd]
    transaction: bool = False


Steps = Generator["RoundTrip | TokenEvent", Any, Any]


def blocking_read(trip: RoundTrip) -> tuple[str, Any, int, int] | None:
    """(stream, last id, count, block ms) when a round trip opens with a blocking XREAD of one stream (what
    result_steps and stream_steps wait with; commands after it are plain reads), else None."""
    if trip.transaction or not trip.cmds:
        return None
    name, args, kw = trip.cmds[0]
    if name != "xread" or kw.get("block") is None or len(args) != 1 or len(args[0]) != 1:
        return None
    ((key, last),) = args[0].items()
    return key, last, kw.get("count") or XREAD_COUNT, kw["block"]


@dataclass(slots=True)
class Context:
    """What both clients share: key layout, validation limits, TTLs and timings."""

    keys: Keys = field(default_factory=Keys)
    limits: Limits = field(default_factory=Limits.from_env)
    defaults: Defaults = field(default_factory=Defaults.from_env)
    durable: bool = False  # enqueues return only once a replica has the job (WAIT 1), else raise not_replicated

    @classmethod
    def build(cls, prefix: str, limits: Limits | None, defaults: Defaults | None, job_shards: int | None = None,
              durable: bool = False) -> Context:
        """A context from a client's constructor arguments (None: from the environment)."""
        defaults = defaults or Defaults.from_env()
        keys = Keys(prefix, job_shards=defaults.job_shards if job_shards is None else job_shards)
        return cls(keys, limits or Limits.from_env(), defaults, durable)


class ClientBase:
    """What Client and AsyncClient share: the context (keys, limits, defaults) and how they connect."""

    _connect: Any  # spool.protocol.connection.connect or connect_async, set by the subclass

    def __init__(self, redis_url: str | None = None, prefix: str = DEFAULT_PREFIX, limits: Limits | None = None,
                 *, defaults: Defaults | None = None, connection: Any = None, job_shards: int | None = None,
                 durable: bool = False):
        """job_shards: jobs streams per priority (default SPOOL_JOB_SHARDS, else 1); durable: every enqueue
        waits until a replica has the job (WAIT 1; see docs/OPERATIONS.md, Failover)."""
        self.ctx = Context.build(prefix, limits, defaults, job_shards, durable)
        # decode_responses=False: payloads stay bytes for orjson, and one code path serves both clients.
        # Resolving the URL may start the embedded server: a one-off blocking step at construction time.
        self.redis = connection if connection is not None else type(self)._connect(resolve_url(redis_url),
                                                                                   defaults=self.ctx.defaults)
        if durable and is_cluster(self.redis):
            # WAIT counts the replicas of the one node it is sent to, on the connection of the writes: on a
            # cluster those are spread over nodes and connections.
            raise ValueError("durable=True needs a single master (plain or Sentinel); Redis Cluster is not supported")

    @property
    def keys(self) -> Keys:
        """The key layout in use."""
        return self.ctx.keys


def resolve_url(redis_url: str | None) -> str:
    """The given URL, else $SPOOL_REDIS_URL, else $SPOOL_REDIS_SENTINELS + $SPOOL_REDIS_MASTER, else the
    embedded local server's socket URL."""
    url = redis_url or env_text(ENV_REDIS_URL) or sentinel_url_from_env()
    if url:
        return url
    from spool.producer.embedded import ensure_local_redis  # only pay for it when no server is configured

    return ensure_local_redis()


def build_job(
    ctx: Context,
    prompt: str | None = None,
    *,
    messages: list[Mapping[str, Any]] | None = None,
    prompt_token_ids: list[int] | None = None,
    id: str | None = None,
    stream: bool = False,
    priority: str = DEFAULT_PRIORITY,
    deadline: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    **sampling: Any,
) -> tuple[str, str, bytes]:
    """Encode one job as (id, jobs stream key, JSON bytes), validated exactly as a worker will."""
    try:
        validate_priority(priority)
    except ValueError as e:
        raise JobError("invalid_job", str(e)) from None
    # id first: a worker recovers a leading id even from a document it cannot parse.
    doc: dict[str, Any] = {"id": new_id() if id is None else id, "v": PROTOCOL_VERSION}
    given = {"prompt": prompt, "messages": messages, "prompt_token_ids": prompt_token_ids,
             "deadline": deadline, "metadata": metadata, **sampling}
    doc.update((k, v) for k, v in given.items() if v is not None)  # None means "the protocol default"
    if stream:
        doc["stream"] = stream
    try:
        raw = orjson.dumps(doc)
    except TypeError as e:
        raise JobError("invalid_job", f"job is not JSON-serializable: {e}", None) from None
    job = parse_job(raw, ctx.limits)
    # The stream, not the document, carries the priority; a document naming another one would be confusing.
    return job.id, ctx.keys.job_stream(job.id, priority), raw  # type: ignore[arg-type]


def enqueue_steps(ctx: Context, prompt: str | None, **kwargs: Any) -> Steps:
    """Validate and enqueue one job (build_job's arguments) idempotently; returns its id.

    Sending the same document under the same id again adds nothing (a retry after a lost reply is safe);
    another document under an id that is queued, running or finished fails with JobError duplicate_id.
    """
    job = build_job(ctx, prompt, **kwargs)
    (reply,) = yield from flow_steps(enqueue_flow(ctx.keys, ctx.defaults, [job], durable=ctx.durable))
    if reply == DUPLICATE_ID:
        raise JobError("duplicate_id", duplicate_id_message(job[0]), job[0])
    return job[0]


def flow_steps(flow: Flow) -> Steps:
    """Run a spool.protocol.commands flow (enqueue_flow) as this module's round trips; returns its value."""
    replies = None
    try:
        while True:
            replies = yield RoundTrip(flow.send(replies))
    except StopIteration as stop:
        return stop.value


def enqueue_many_steps(ctx: Context, jobs: Iterable[Mapping[str, Any]]) -> Steps:
    """Validate and enqueue many jobs, pipelined in chunks; returns their ids in order.

    On an invalid job, the jobs before it are sent, then JobError is raised with their ids in `.enqueued`.
    On a duplicate_id, the rest of its chunk is sent too and `.enqueued` names every id that was accepted.
    When Redis is full (RedisFullError, thrown in by the client), `.enqueued` names the chunks sent before.
    """
    sent: list[str] = []
    try:
        return (yield from _enqueue_many(ctx, jobs, sent))
    except RedisFullError as e:
        e.enqueued = list(sent)
        raise


def _enqueue_many(ctx: Context, jobs: Iterable[Mapping[str, Any]], sent: list[str]) -> Steps:
    pending: list[tuple[str, str, bytes]] = []
    error: JobError | None = None
    chunk_start = 0  # index of the first job in `pending`
    for i, spec in enumerate(jobs):
        try:
            if not isinstance(spec, Mapping):
                raise JobError("invalid_job", f"expected a dict of enqueue() arguments, got {type(spec).__name__}")
            job = build_job(ctx, **spec)
        except (JobError, TypeError) as e:
            code, msg, jid = (e.code, e.message, e.id) if isinstance(e, JobError) else ("invalid_job", str(e), None)
            error = JobError(code, f"job #{i}: {msg}", jid)
            break
        pending.append(job)
        if len(pending) >= ctx.defaults.enqueue_chunk:
            error = yield from _send_chunk(ctx, pending, sent, chunk_start)
            pending, chunk_start = [], i + 1
            if error is not None:
                break
    if pending:  # the jobs before an invalid one are sent, as promised
        error = (yield from _send_chunk(ctx, pending, sent, chunk_start)) or error
    if error is not None:
        error.enqueued = sent
        raise error
    return sent


def _send_chunk(ctx: Context, jobs: list[tuple[str, str, bytes]], sent: list[str], first: int) -> Steps:
    """Enqueue one chunk; accepted ids go to `sent`; returns the JobError of its first duplicate, if any."""
    try:
        replies = yield from flow_steps(enqueue_flow(ctx.keys, ctx.defaults, jobs, durable=ctx.durable))
    except JobError as e:  # not_replicated: the chunk is enqueued, but no replica has it yet
        sent += e.enqueued
        return e
    error = None
    for n, ((id, _, _), reply) in enumerate(zip(jobs, replies)):
        if reply == DUPLICATE_ID:
            error = error or JobError("duplicate_id", f"job #{first + n}: {duplicate_id_message(id)}", id)
        else:
            sent.append(id)
    return error


def _block_ms(deadline: float | None, block_ms: int, what: str) -> int:
    """Milliseconds for the next blocking read, or TimeoutError once the deadline has passed."""
    if deadline is None:
        return block_ms
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(what)
    return max(1, min(block_ms, math.ceil(left * 1000)))  # BLOCK 0 would mean forever


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def result_steps(ctx: Context, id: str, timeout: float | None) -> Steps:
    """Wait for the final Result of `id`; TimeoutError after `timeout` seconds (None: forever)."""
    deadline = _deadline(timeout)
    rkey, tkey = ctx.keys.result(id), ctx.keys.tokens(id)
    raw, tail = yield RoundTrip([cmd("get", rkey), cmd("xrevrange", tkey, "+", "-", count=1)])
    last = tail[0][0] if tail else b"0-0"  # only entries newer than now can be the wake-up we wait for
    while raw is None:
        block = _block_ms(deadline, ctx.defaults.block_ms, f"no result for {id!r} within {timeout}s")
        # One round trip: Redis runs the GET right after XREAD returns, on a done entry or after `block` ms,
        # so a missed wake-up (or a worker that never writes one) costs at most one block.
        reply, raw = yield RoundTrip([cmd("xread", {tkey: last}, count=XREAD_COUNT, block=block), cmd("get", rkey)])
        entries = xread_entries(reply)
        if entries:
            last = entries[-1][0]
    return Result.from_json(raw)


def stream_steps(ctx: Context, id: str, timeout: float | None, last_id: str | bytes, batches: bool = False) -> Steps:
    """Yield the TokenEvents of `id` after `last_id` until the done event (restart events included).

    batches: yield each read's events as one list instead, and an empty list after a read that found nothing
    (every `block_ms` of silence), so a caller can write them at once and knows when the stream is quiet.
    """
    deadline = _deadline(timeout)
    rkey, tkey = ctx.keys.result(id), ctx.keys.tokens(id)
    last = last_id.decode() if isinstance(last_id, bytes) else str(last_id)
    while True:
        block = _block_ms(deadline, ctx.defaults.block_ms, f"stream of {id!r} not done within {timeout}s")
        (reply,) = yield RoundTrip([cmd("xread", {tkey: last}, count=XREAD_COUNT, block=block)])
        entries = xread_entries(reply)
        if not entries:
            # Idle: if the result is final but its done entry is gone (expired, trimmed, or we resumed past
            # it), finish from the result. One MULTI so a done written in between cannot slip through.
            raw, entries = yield RoundTrip([cmd("get", rkey), cmd("xrange", tkey, f"({last}", "+", count=XREAD_COUNT)],
                                           transaction=True)
            if not entries and raw is not None:
                res = Result.from_json(raw)
                done = TokenEvent.done(res.status, res.finish_reason)
                yield [done] if batches else done
                return
        events = []
        for entry_id, fields in entries:
            event = TokenEvent.from_fields(fields, entry_id)
            last = event.entry_id  # type: ignore[assignment]
            events.append(event)
            if event.finished:
                break
        if batches:
            yield events
        else:
            for event in events:
                yield event
        if events and events[-1].finished:
            return


def cancel_steps(ctx: Context, id: str) -> Steps:
    """Mark `id` cancelled (key with TTL) and wake workers (cancels stream)."""
    # Not a transaction: the cancel key (the source of truth) and the cancels stream live in different hash
    # slots on a cluster; the key is written first, and a wake-up without it still cancels a running job.
    yield RoundTrip(cancel_cmds(ctx.keys, ctx.defaults, id))


def status_steps(ctx: Context, id: str) -> Steps:
    """Final status from the result if present, else 'queued' | 'running' from the status key, else 'unknown'."""
    raw, status = yield RoundTrip([cmd("get", ctx.keys.result(id)), cmd("get", ctx.keys.status(id))])
    if raw is not None:
        return str(orjson.loads(raw).get("status", "unknown"))
    if status is not None:
        text = status.decode() if isinstance(status, bytes) else str(status)
        return "queued" if text == "enqueuing" else text  # claimed, its XADD about to follow (spool.protocol.scripts)
    return "unknown"


def run_to_end(steps: Generator[Any, Any, Any]) -> Any:
    """Exhaust a generator that yields nothing for the caller and return its return value."""
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return stop.value


@dataclass(slots=True)
class Finished:
    """A verb's return value, once its generator is exhausted."""

    value: Any


def advance(steps: Steps, reply: Any) -> RoundTrip | TokenEvent | Finished:
    """Send the last round trip's replies (None after an event) into a verb; returns what it wants next."""
    try:
        return steps.send(reply)
    except StopIteration as stop:
        return Finished(stop.value)
