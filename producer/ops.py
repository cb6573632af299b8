"""Client logic shared by Client and AsyncClient, written once as I/O-free generators.

Each verb is a generator that yields a `Batch` of Redis commands (run in one round trip) and receives the
list of replies, or yields a TokenEvent for the caller. The sync and async clients only execute batches,
so encoding, waiting and decoding rules cannot drift apart between the two.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from producer.defaults import ENV_REDIS_URL, Defaults
from producer.keys import DEFAULT_PRIORITY, Keys, new_id, validate_id, validate_priority
from producer.schema import PROTOCOL_VERSION, JobError, Limits, Result, TokenEvent, parse_job

Cmd = tuple[str, tuple[Any, ...], dict[str, Any]]
XREAD_COUNT = 512  # entries per read; a long stream is drained over several round trips


@dataclass(slots=True)
class Batch:
    """Commands for one round trip; transaction=True wraps them in MULTI/EXEC."""

    cmds: list[Cmd]
    transaction: bool = False


Steps = Generator["Batch | TokenEvent", Any, Any]


@dataclass(slots=True)
class Context:
    """What both clients share: key layout, validation limits, TTLs and timings."""

    keys: Keys = field(default_factory=Keys)
    limits: Limits = field(default_factory=Limits.from_env)
    defaults: Defaults = field(default_factory=Defaults.from_env)


def resolve_url(redis_url: str | None) -> str:
    """The given URL, else $SPOOL_REDIS_URL, else the embedded local server's socket URL."""
    if redis_url:
        return redis_url
    if os.environ.get(ENV_REDIS_URL):
        return os.environ[ENV_REDIS_URL]
    from producer.embedded import ensure_local_redis  # only pay for it when no server is configured

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
    return job.id, ctx.keys.jobs(priority), raw  # type: ignore[return-value]


def _enqueue_cmds(ctx: Context, id: str, stream_key: str, raw: bytes) -> list[Cmd]:
    # Status before XADD inside MULTI: a fast worker's "running" must never be overwritten by our "queued".
    return [("set", (ctx.keys.status(id), "queued"), {"ex": ctx.defaults.status_ttl_s}),
            ("xadd", (stream_key, {"job": raw}), {})]


def enqueue_steps(ctx: Context, prompt: str | None, **kwargs: Any) -> Steps:
    """Validate and XADD one job (build_job's arguments); returns its id."""
    id, stream_key, raw = build_job(ctx, prompt, **kwargs)
    yield Batch(_enqueue_cmds(ctx, id, stream_key, raw), transaction=True)
    return id


def enqueue_many_steps(ctx: Context, jobs: Iterable[Mapping[str, Any]]) -> Steps:
    """Validate and XADD many jobs, one MULTI/EXEC per chunk; returns their ids in order.

    On an invalid job, the jobs before it are sent, then JobError is raised with their ids in `.enqueued`.
    """
    sent: list[str] = []
    pending: list[str] = []
    cmds: list[Cmd] = []
    error: JobError | None = None
    for i, spec in enumerate(jobs):
        try:
            if not isinstance(spec, Mapping):
                raise JobError("invalid_job", f"expected a dict of enqueue() arguments, got {type(spec).__name__}")
            id, stream_key, raw = build_job(ctx, **spec)
        except (JobError, TypeError) as e:
            code, msg, jid = (e.code, e.message, e.id) if isinstance(e, JobError) else ("invalid_job", str(e), None)
            error = JobError(code, f"job #{i}: {msg}", jid)
            break
        pending.append(id)
        cmds += _enqueue_cmds(ctx, id, stream_key, raw)
        if len(pending) >= ctx.defaults.enqueue_chunk:
            yield Batch(cmds, transaction=True)
            sent += pending
            pending, cmds = [], []
    if cmds:
        yield Batch(cmds, transaction=True)
        sent += pending
    if error is not None:
        error.enqueued = sent
        raise error
    return sent


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


def xread_entries(reply: Any) -> list[tuple[Any, Any]]:
    """Entries of a single-stream XREAD reply, for RESP2 ([[key, entries]]) and RESP3 ({key: [entries]})."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        (entries,) = reply.values()
        return entries[0] if entries and isinstance(entries[0], list) else entries
    return reply[0][1]


def result_steps(ctx: Context, id: str, timeout: float | None) -> Steps:
    """Wait for the final Result of `id`; TimeoutError after `timeout` seconds (None: forever)."""
    deadline = _deadline(timeout)
    rkey, tkey = ctx.keys.result(id), ctx.keys.tokens(id)
    raw, tail = yield Batch([("get", (rkey,), {}), ("xrevrange", (tkey, "+", "-"), {"count": 1})])
    last = tail[0][0] if tail else b"0-0"  # only entries newer than now can be the wake-up we wait for
    while raw is None:
        block = _block_ms(deadline, ctx.defaults.block_ms, f"no result for {id!r} within {timeout}s")
        # One round trip: Redis runs the GET right after XREAD returns, on a done entry or after `block` ms,
        # so a missed wake-up (or a worker that never writes one) costs at most one block.
        reply, raw = yield Batch([("xread", ({tkey: last},), {"count": XREAD_COUNT, "block": block}),
                                  ("get", (rkey,), {})])
        entries = xread_entries(reply)
        if entries:
            last = entries[-1][0]
    return Result.from_json(raw)


def stream_steps(ctx: Context, id: str, timeout: float | None, last_id: str | bytes) -> Steps:
    """Yield the TokenEvents of `id` after `last_id` until the done event (restart events included)."""
    deadline = _deadline(timeout)
    rkey, tkey = ctx.keys.result(id), ctx.keys.tokens(id)
    last = last_id.decode() if isinstance(last_id, bytes) else str(last_id)
    while True:
        block = _block_ms(deadline, ctx.defaults.block_ms, f"stream of {id!r} not done within {timeout}s")
        (reply,) = yield Batch([("xread", ({tkey: last},), {"count": XREAD_COUNT, "block": block})])
        entries = xread_entries(reply)
        if not entries:
            # Idle: if the result is final but its done entry is gone (expired, trimmed, or we resumed past
            # it), finish from the result. One MULTI so a done written in between cannot slip through.
            raw, entries = yield Batch([("get", (rkey,), {}),
                                        ("xrange", (tkey, f"({last}", "+"), {"count": XREAD_COUNT})],
                                       transaction=True)
            if not entries and raw is not None:
                res = Result.from_json(raw)
                yield TokenEvent.done(res.status, res.finish_reason)
                return
        for entry_id, fields in entries:
            event = TokenEvent.from_fields(fields, entry_id)
            last = event.entry_id  # type: ignore[assignment]
            yield event
            if event.finished:
                return


def cancel_steps(ctx: Context, id: str) -> Steps:
    """Mark `id` cancelled (key with TTL) and wake workers (cancels stream)."""
    k = ctx.keys
    yield Batch([("set", (k.cancel(id), "1"), {"ex": ctx.defaults.cancel_ttl_s}),
                 ("xadd", (k.cancels, {"id": validate_id(id)}),
                  {"maxlen": ctx.defaults.cancels_maxlen, "approximate": True})], transaction=True)


def status_steps(ctx: Context, id: str) -> Steps:
    """Final status from the result if present, else 'queued' | 'running' from the status key, else 'unknown'."""
    raw, status = yield Batch([("get", (ctx.keys.result(id),), {}), ("get", (ctx.keys.status(id),), {})])
    if raw is not None:
        return str(orjson.loads(raw).get("status", "unknown"))
    if status is not None:
        return status.decode() if isinstance(status, bytes) else str(status)
    return "unknown"


def run_to_end(steps: Generator[Any, Any, Any]) -> Any:
    """Exhaust a generator that yields nothing for the caller and return its return value."""
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return stop.value
