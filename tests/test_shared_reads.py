"""AsyncClient(shared_reads=True) (spool/producer/reads.py): the verbs waiting at once share one blocking XREAD,
against a real redis-server with a thread playing the worker."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from spool.producer import AsyncClient, Keys, Result, TokenEvent
from spool.producer.reads import SharedReads, entry_key
from spool.protocol.defaults import Defaults

KEYS = Keys()
SLOW = Defaults(block_ms=5_000)  # a long block: a waiter that has to wait for it shows


def finish(r: redis.Redis, *ids: str, text: str | None = None) -> None:
    """What a worker does when requests end (in one step): result key and done entry, in one MULTI/EXEC."""
    with r.pipeline(transaction=True) as p:
        for id in ids:
            res = Result(id=id, status="completed", choices=[{"index": 0, "text": text or id, "token_ids": [1],
                                                               "finish_reason": "stop"}])
            p.set(KEYS.result(id), res.to_json(), ex=60)
            p.xadd(KEYS.tokens(id), TokenEvent.done("completed", "stop").to_fields())
        p.execute()


def later(delay: float, fn, *args) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), fn(*args)), daemon=True)
    t.start()
    return t


@pytest.fixture
def r(redis_url):
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def _blocked_reads(r: redis.Redis) -> int:
    """Connections blocked in an XREAD right now."""
    return sum(1 for c in r.client_list() if c["cmd"] == "xread" and "b" in c["flags"])


def test_many_waiting_results_share_reads_and_connections(redis_url, r):
    """60 result() waits at once: every result arrives, through a handful of XREADs, one connection blocked in
    XREAD at a time (one blocking XREAD per waiter would hold 60)."""
    ids = [f"many-{i}" for i in range(60)]

    async def main():
        async with AsyncClient(redis_url, defaults=SLOW, shared_reads=True) as c:
            waits = [asyncio.ensure_future(c.result(i, timeout=20)) for i in ids]
            await asyncio.sleep(0.5)
            held = _blocked_reads(r)
            t0 = time.monotonic()
            reads_before = c.shared_reads.reads
            later(0.0, finish, r, *ids)
            results = await asyncio.gather(*waits)
            return results, held, time.monotonic() - t0, c.shared_reads.reads - reads_before, c.shared_reads._subs

    results, held, took, reads, subs = asyncio.run(main())
    assert [res.text for res in results] == ids
    assert held == 1, held
    assert took < 3.0  # woken by the done entries, not by the 5 s block
    assert reads <= 5, reads  # the step's 60 done entries come back in one XREAD (a few if it was cut short)
    assert subs == {}  # every verb released its stream


async def wait_beside_a_blocked_read(url: str, r, rid: str):
    """A waiter on a quiet stream holds the shared XREAD; `rid` finishes meanwhile and is then waited for:
    (its result, seconds that wait took, the client, closed)."""
    async with AsyncClient(url, defaults=SLOW, shared_reads=True) as c:
        quiet = asyncio.ensure_future(c.result("quiet", timeout=20))
        await asyncio.sleep(0.3)  # the XREAD now blocks on the quiet stream alone
        finish(r, rid, text="Hello")  # already done when its waiter comes
        t0 = time.monotonic()
        res = await c.result(rid, timeout=20)
        took = time.monotonic() - t0
        quiet.cancel()
        await asyncio.gather(quiet, return_exceptions=True)
    return res, took, c


def test_a_new_waiter_is_not_held_up_by_the_block(redis_url, r):
    """A waiter that subscribes while the shared XREAD blocks (on another stream) gets its entry at once: CLIENT
    UNBLOCK ends the XREAD so that the next one names the new stream."""
    res, took, c = asyncio.run(wait_beside_a_blocked_read(redis_url, r, "prompt"))
    assert res.text == "Hello" and took < 1.0, took
    assert c.shared_reads._subs == {}  # a cancelled wait releases its stream too


def test_stream_through_shared_reads_matches_plain_reads(redis_url, r):
    """stream() yields the same events (deltas, restart, done, a resume after an entry) either way."""
    rid = "streamed"

    def write() -> None:
        for ev in [TokenEvent.delta(0, "He", [1]), TokenEvent.restart("worker died"), TokenEvent.delta(0, "Hey", [2])]:
            r.xadd(KEYS.tokens(rid), ev.to_fields())
            time.sleep(0.05)
        finish(r, rid, text="Hey")

    async def read(shared: bool, last_id: str = "0-0"):
        async with AsyncClient(redis_url, defaults=Defaults(block_ms=200), shared_reads=shared) as c:
            return [e async for e in c.stream(rid, timeout=10, last_id=last_id)]

    writer = later(0.2, write)
    shared = asyncio.run(read(True))
    writer.join()
    plain = asyncio.run(read(False))
    resumed = asyncio.run(read(True, shared[1].entry_id))
    assert [e.type for e in shared] == ["delta", "restart", "delta", "done"]
    assert shared == plain and resumed == shared[2:]


def test_shared_reads_fall_back_to_short_blocks_without_client_unblock(redis_server, r):
    """An ACL user without CLIENT (no CLIENT ID / UNBLOCK): reads still arrive, blocking at most the fallback."""
    r.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all", "-client")
    url = f"redis://limited:pw@127.0.0.1:{redis_server.port}/0"

    res, took, c = asyncio.run(wait_beside_a_blocked_read(url, r, "late"))
    assert res.text == "Hello" and took < 1.0 and c.shared_reads._can_unblock is False


def test_a_full_buffer_leaves_its_stream_to_redis(redis_url, r):
    """A subscription holding `count` unread entries is left out of the XREADs until it drains; nothing is lost."""
    key = KEYS.tokens("backlog")
    for i in range(7):
        r.xadd(key, {"type": "delta", "n": str(i)})

    async def main():
        reads = SharedReads(redis.asyncio.Redis.from_url(redis_url), block_ms=200)
        sub = reads.subscribe(key, "0-0", count=3)
        got, last = [], "0-0"
        while len(got) < 7:
            reply = await reads.read(sub, last, 2000)
            (stream, entries), = reply
            assert stream == key and len(entries) <= 3
            got += [int(fields[b"n"]) for _, fields in entries]
            last = entries[-1][0].decode()
            assert len(sub.buffer) <= 3
        reads.release(sub)
        await reads.aclose()
        await reads.redis.aclose()
        return got

    assert asyncio.run(main()) == list(range(7))


def test_entry_key_orders_stream_ids():
    assert entry_key(b"10-2") > entry_key("9-99") > entry_key("9-1") > entry_key("0-0")
    assert entry_key("5") == (5, 0)


def test_blocking_reads_are_told_apart_from_other_round_trips():
    from spool.producer.ops import RoundTrip, blocking_read
    from spool.protocol.commands import cmd

    xread = cmd("xread", {"k": "1-0"}, count=5, block=100)
    assert blocking_read(RoundTrip([xread, cmd("get", "r")])) == ("k", "1-0", 5, 100)
    assert blocking_read(RoundTrip([cmd("xread", {"k": "1-0"}, count=5)])) is None  # no BLOCK
    assert blocking_read(RoundTrip([cmd("xread", {"a": "0", "b": "0"}, block=1)])) is None  # two streams
    assert blocking_read(RoundTrip([xread], transaction=True)) is None
    assert blocking_read(RoundTrip([cmd("get", "r")])) is None


def test_shared_reads_are_opt_in(redis_url):
    async def main():
        shared = AsyncClient(redis_url, shared_reads=True)
        plain = AsyncClient(redis_url)
        out = shared.shared_reads is not None, plain.shared_reads is None
        await shared.aclose()
        await plain.aclose()
        return out

    assert asyncio.run(main()) == (True, True)
