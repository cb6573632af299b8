"""Small Redis command builders both sides of the wire use, and helpers to read Redis replies.

A command is a `Cmd` (redis-py method name, args, kwargs); a list of them runs in one round trip with
`execute` (MULTI/EXEC when `transaction`). Enqueue and cancel are built here once, so the clients, the batch
runner and the admin verbs cannot drift apart on what a job or a cancel looks like in Redis.
"""
from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

from spool.protocol.connection import is_cluster, script_route
from spool.protocol.defaults import Defaults
from spool.protocol.keys import Keys, validate_id
from spool.protocol.scripts import ENQUEUE, MARK_QUEUED

Cmd = tuple[str, tuple[Any, ...], dict[str, Any]]
XREAD_COUNT = 512  # entries per read; a long stream is drained over several round trips


def cmd(name: str, *args: Any, **kw: Any) -> Cmd:
    """One Redis command: cmd("set", key, value, ex=10)."""
    return name, args, kw


def execute(redis_client: Any, cmds: list[Cmd], transaction: bool = False) -> list[Any]:
    """Run commands in one round trip (MULTI/EXEC if `transaction`) on a redis.Redis; returns their replies."""
    cluster = is_cluster(redis_client)
    with redis_client.pipeline(transaction=transaction) as pipe:
        for name, args, kw in cmds:
            routed = cluster and name == "execute_command"  # a script call: name its node (script_route)
            getattr(pipe, name)(*args, **(script_route(redis_client, args, kw) if routed else kw))
        return pipe.execute()


async def execute_async(redis_client: Any, cmds: list[Cmd], transaction: bool = False) -> list[Any]:
    """The asyncio twin of execute(), on a redis.asyncio.Redis."""
    async with redis_client.pipeline(transaction=transaction) as pipe:
        for name, args, kw in cmds:
            getattr(pipe, name)(*args, **kw)
        return await pipe.execute()


def as_str(value: Any, errors: str = "strict") -> str:
    """Decode a Redis reply field (bytes without decode_responses) to str; other values through str()."""
    return value.decode(errors=errors) if isinstance(value, bytes) else str(value)


def entry_field(fields: Mapping[Any, Any], name: str) -> Any:
    """A stream entry field by name, whether the client decoded responses (str keys) or not (bytes)."""
    value = fields.get(name.encode())
    return fields.get(name) if value is None else value


def xread_entries(reply: Any) -> list[tuple[Any, Any]]:
    """Entries of a single-stream XREAD reply, for RESP2 ([[key, entries]]) and RESP3 ({key: [entries]})."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        (entries,) = reply.values()
        return entries[0] if entries and isinstance(entries[0], list) else entries
    return reply[0][1]


def enqueue_cmd(keys: Keys, defaults: Defaults, id: str, raw: bytes) -> Cmd:
    """Claim `id` for this document (spool.protocol.scripts.ENQUEUE), the first step of enqueue_flow.

    The reply is ENQUEUED (1: XADD it now), ALREADY_ENQUEUED (0: this very document holds the id; a resend adds
    nothing) or DUPLICATE_ID (-1: another document holds the id, queued, running or finished).
    """
    return ENQUEUE.eval_cmd([keys.digest(id), keys.status(id), keys.result(id)],
                            [raw, defaults.status_ttl_s, defaults.result_ttl_s])


# A round trip of an enqueue: the commands to send, the replies in return (see enqueue_flow).
Flow = Generator[list[Cmd], list[Any], list[int]]


def enqueue_flow(keys: Keys, defaults: Defaults, jobs: list[tuple[str, str, bytes]], *, durable: bool = False,
                 prior: list[Cmd] | None = None) -> Flow:
    """Enqueue (id, jobs stream, document) triples in three pipelined round trips; returns each job's claim reply.

    1. ENQUEUE claims each id (one slot per request); 2. the claimed documents are XADDed (with WAIT 1 when
    `durable`, on the same connection, so it covers these XADDs); 3. MARK_QUEUED. Each step is sent only after
    the one before succeeded, so a status reads `queued` only once its entry exists, on one Redis or on a
    cluster. `prior` commands ride in the first round trip (their replies are dropped). With `durable`, a job
    no replica acknowledged raises JobError `not_replicated` after all three steps (its `claims`: the claim
    replies): the job is enqueued on the master and may still run, but a failover right now could lose it.
    """
    prior = prior or []
    replies = yield [*prior, *(enqueue_cmd(keys, defaults, id, raw) for id, _, raw in jobs)]
    claims = [int(r) for r in replies[len(prior):]]
    todo = [job for job, claim in zip(jobs, claims) if claim == ENQUEUED]
    if not todo:
        return claims
    adds = [cmd("xadd", stream, {"job": raw}) for _, stream, raw in todo]
    if durable:
        adds.append(cmd("wait", 1, defaults.durable_timeout_ms))
    added = yield adds
    yield [MARK_QUEUED.eval_cmd([keys.status(id)], []) for id, _, _ in todo]
    if durable and int(added[-1]) < 1:
        from spool.protocol.job import JobError  # spool.protocol.job imports this module: import at use

        ids = [id for id, _, _ in todo]
        error = JobError("not_replicated",
                       f"{len(ids)} job(s) enqueued on the master, but no replica acknowledged them within "
                       f"{defaults.durable_timeout_ms} ms (WAIT 1): they exist and will run unless the master "
                       f"fails before replicating them; check the replicas (INFO replication)",
                       ids[0] if len(ids) == 1 else None)
        error.enqueued = [id for (id, _, _), claim in zip(jobs, claims) if claim != DUPLICATE_ID]
        error.claims = claims  # what the flow would have returned: a caller answering per job still needs them
        raise error
    return claims


def run_flow(redis_client: Any, flow: Flow) -> list[int]:
    """Drive an enqueue_flow on a redis.Redis (or RedisCluster); returns its claim replies."""
    replies: list[Any] | None = None
    try:
        while True:
            replies = execute(redis_client, flow.send(replies))  # type: ignore[arg-type]
    except StopIteration as stop:
        return stop.value


async def run_flow_async(redis_client: Any, flow: Flow) -> list[int]:
    """The asyncio twin of run_flow()."""
    replies: list[Any] | None = None
    try:
        while True:
            replies = await execute_async(redis_client, flow.send(replies))  # type: ignore[arg-type]
    except StopIteration as stop:
        return stop.value


ENQUEUED, ALREADY_ENQUEUED, DUPLICATE_ID = 1, 0, -1


def duplicate_id_message(id: str) -> str:
    """The one-line reason of a duplicate_id failure."""
    return (f"id {id!r} is already taken by another job document (queued, running or finished); "
            "use a new id, or resend exactly the same document")


def cancel_cmds(keys: Keys, defaults: Defaults, id: str) -> list[Cmd]:
    """Mark `id` cancelled (a key with a TTL, the source of truth) and wake workers (the cancels stream)."""
    return [cmd("set", keys.cancel(id), "1", ex=defaults.cancel_ttl_s),
            cmd("xadd", keys.cancels, {"id": validate_id(id)}, maxlen=defaults.cancels_maxlen, approximate=True)]


def queue_backlog(redis_client: Any, streams: list[str], group: str) -> dict[str, int]:
    """Jobs waiting or running per jobs stream: the group's lag plus its pending entries.

    Without the group (no worker started yet) every entry is lag; where Redis cannot give the lag (6.2, or
    entries deleted after the group's cursor) the stream length is used, which is the same number because
    workers delete acknowledged entries.
    """
    pipe = redis_client.pipeline(transaction=False)
    for stream in streams:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
    replies = pipe.execute(raise_on_error=False)
    out: dict[str, int] = {}
    for i, stream in enumerate(streams):
        length, groups = replies[2 * i], replies[2 * i + 1]
        if isinstance(length, Exception):
            raise length
        value = int(length)
        for g in groups if isinstance(groups, list) else []:
            if as_str(g.get("name", b"")) == group and g.get("lag") is not None:
                value = int(g["lag"]) + int(g.get("pending") or 0)
        out[stream] = value
    return out
