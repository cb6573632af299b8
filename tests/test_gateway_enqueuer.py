"""spool/gateway/enqueuer.py: concurrent requests' enqueues leave together, each job keeps its own claim reply, against
a real redis-server."""
from __future__ import annotations

import asyncio

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from spool.gateway.enqueuer import Enqueuer
from spool.protocol import JobError, Keys
from spool.protocol.commands import ALREADY_ENQUEUED, DUPLICATE_ID, ENQUEUED
from spool.protocol.defaults import Defaults

KEYS = Keys()


def _doc(rid: str, prompt: str = "hi") -> bytes:
    return orjson.dumps({"id": rid, "v": 2, "prompt": prompt})


def test_concurrent_enqueues_share_flows_and_keep_their_replies(redis_url):
    """40 enqueues at once (two of them resends, one a conflicting document) leave in a few flows; each job gets
    the reply a flow of its own would have given it, and the jobs stream holds each accepted job once."""
    async def main():
        conn = aioredis.Redis.from_url(redis_url)
        enq = Enqueuer(conn, KEYS, Defaults())
        first = await enq.enqueue("solo", KEYS.job_stream("solo"), _doc("solo"))
        jobs = [(f"job-{i}", _doc(f"job-{i}")) for i in range(40)]
        jobs += [("job-3", _doc("job-3")), ("job-5", _doc("job-5", "another prompt"))]  # a resend, a conflict
        replies = await asyncio.gather(*(enq.enqueue(rid, KEYS.job_stream(rid), doc) for rid, doc in jobs))
        flows = enq.flows
        await enq.aclose()
        await conn.aclose()
        return first, replies, flows

    first, replies, flows = asyncio.run(main())
    assert first == ENQUEUED
    assert replies[:40] == [ENQUEUED] * 40 and replies[40:] == [ALREADY_ENQUEUED, DUPLICATE_ID]
    assert flows <= 4, flows  # the solo flow, then the burst in one or two
    r = redis.Redis.from_url(redis_url)
    ids = [orjson.loads(fields[b"job"])["id"] for _, fields in r.xrange(KEYS.job_stream("x"))]
    assert sorted(ids) == sorted(["solo", *(f"job-{i}" for i in range(40))])  # the resend added nothing
    assert {r.get(KEYS.status(f"job-{i}")) for i in range(40)} == {b"queued"}


def test_a_flow_that_fails_fails_each_of_its_jobs(redis_url):
    """Redis unreachable: every job waiting on the flow gets the error (the gateway answers each with a 503)."""
    async def main():
        conn = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
        enq = Enqueuer(conn, KEYS, Defaults())
        out = await asyncio.gather(*(enq.enqueue(f"e-{i}", KEYS.job_stream(f"e-{i}"), _doc(f"e-{i}"))
                                     for i in range(5)), return_exceptions=True)
        await conn.aclose()
        return out

    out = asyncio.run(main())
    assert len(out) == 5 and all(isinstance(e, redis.ConnectionError) for e in out), out


def test_durable_flow_without_a_replica_reports_not_replicated_per_job(redis_url):
    """--durable and no replica: each job the flow enqueued gets not_replicated naming it; a duplicate in the same
    flow still gets its duplicate reply."""
    async def main():
        conn = aioredis.Redis.from_url(redis_url)
        enq = Enqueuer(conn, KEYS, Defaults(durable_timeout_ms=100), durable=True)
        jobs = [("d-1", _doc("d-1")), ("d-2", _doc("d-2")), ("d-1", _doc("d-1", "other"))]
        out = await asyncio.gather(*(enq.enqueue(rid, KEYS.job_stream(rid), doc) for rid, doc in jobs),
                                   return_exceptions=True)
        await conn.aclose()
        return out

    first, second, dup = asyncio.run(main())
    for err, rid in ((first, "d-1"), (second, "d-2")):
        assert isinstance(err, JobError) and err.code == "not_replicated" and err.id == rid
        assert "no replica acknowledged" in err.message
    assert dup == DUPLICATE_ID


@pytest.mark.parametrize("n", [1, 300])
def test_every_job_is_answered_past_one_flows_size(redis_url, n):
    async def main():
        conn = aioredis.Redis.from_url(redis_url, max_connections=64)
        enq = Enqueuer(conn, KEYS, Defaults())
        out = await asyncio.gather(*(enq.enqueue(f"b-{i}", KEYS.job_stream(f"b-{i}"), _doc(f"b-{i}"))
                                     for i in range(n)))
        await conn.aclose()
        return out

    assert asyncio.run(main()) == [ENQUEUED] * n
    assert redis.Redis.from_url(redis_url).xlen(KEYS.job_stream("b")) == n
