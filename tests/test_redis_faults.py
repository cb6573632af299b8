"""Redis faults: restarts with and without AOF, a crash, dropped connections, Redis late at start-up."""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import pytest

from spool.engine import LLMEngine
from spool.producer import AsyncClient, Client
from spool.protocol.connection import connect
from spool.protocol.keys import Keys
from spool.testing.chaos import audit, count_results, wait_for
from tests.worker_harness import running_worker

KEYS = Keys()
AOF = [{"appendonly": True}]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=8)


@contextmanager
def _down_for(server, seconds: float):
    """Redis stops now and starts again after `seconds`; never leaves a server behind, even on failure."""
    server.stop()
    timer = threading.Timer(seconds, server.start)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        if not server.running:
            server.start()


def _jobs(prefix: str, n: int, max_tokens: int = 40) -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"fault {i}", "max_tokens": max_tokens, "ignore_eos": True,
             "stream": i % 3 == 0, "seed": i} for i in range(n)]


@pytest.mark.parametrize("redis_server", AOF, indirect=True)
def test_redis_restart_and_crash_with_aof_lose_nothing(engine, redis_server):
    client = Client(redis_server.url)
    r = client.redis
    ids = client.enqueue_many(_jobs("aof", 120))
    with running_worker(engine, redis_server.url, claim_idle_ms=2000) as w:
        wait_for(lambda: count_results(r, KEYS, ids) >= 10, 60, what="10 results")
        redis_server.restart()  # graceful: SIGTERM, AOF fsynced, same port
        wait_for(lambda: count_results(r, KEYS, ids) >= 50, 60, what="50 results")
        # Crash while the worker holds running jobs: between two read rounds it can hold none, and then
        # nothing would have to wait in the outbox (CI once killed Redis in such a gap).
        wait_for(lambda: len(w.inflight) >= 4, 30, interval=0.0005, what="jobs in flight")
        redis_server.kill()  # a crash (appendfsync always: every acknowledged write is on disk)
        steps = engine.stats.num_steps
        # Down for a while: the engine keeps stepping without Redis (20 more steps, or all it holds done:
        # a fast machine can finish in fewer steps than that) and the results of its jobs wait in the outbox.
        wait_for(lambda: engine.stats.num_steps > steps + 20 or not engine.has_unfinished_requests(), 30,
                 what="engine steps while Redis is down")
        wait_for(lambda: len(w.outbox) > 0, 30, interval=0.01, what="results kept in the outbox")
        redis_server.start()
        wait_for(lambda: count_results(r, KEYS, ids) == len(ids), 90, interval=0.2, what="all results")
    a = audit(r, KEYS, ids)
    assert a.ok and a.statuses == {"completed": 120}, a.summary()
    assert r.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0
    assert engine.block_manager.num_used_blocks == 0


def test_redis_restart_without_persistence_worker_survives(engine, redis_server):
    """Without AOF Redis forgets everything on restart: queued jobs are gone (use AOF), but the worker lives
    on, recreates its groups, writes the results of the jobs it was running, and serves new jobs."""
    client = Client(redis_server.url)
    r = client.redis
    ids = client.enqueue_many(_jobs("mem", 30, max_tokens=60))
    with running_worker(engine, redis_server.url) as w:
        running = wait_for(lambda: list(w.inflight) if w.inflight else None, 30, interval=0.001, what="in flight")
        redis_server.restart()
        wait_for(lambda: count_results(r, KEYS, running) == len(running), 60, what="in-flight results")
        later = client.enqueue_many(_jobs("after", 10, max_tokens=5))
        wait_for(lambda: count_results(r, KEYS, later) == len(later), 60, what="results after restart")
    assert audit(r, KEYS, running).ok and audit(r, KEYS, later).ok
    assert len(ids) == 30


def test_dropped_connections_lose_nothing(engine, redis_server):
    client = Client(redis_server.url)
    admin = redis_server.client()
    ids = client.enqueue_many(_jobs("drop", 80, max_tokens=30))
    kills = 0
    with running_worker(engine, redis_server.url):
        while count_results(admin, KEYS, ids) < len(ids) and kills < 400:
            kills += admin.client_kill_filter(_type="normal", skipme=True)
            time.sleep(0.02)
        wait_for(lambda: count_results(admin, KEYS, ids) == len(ids), 60, what="all results")
    assert kills >= 10
    a = audit(admin, KEYS, ids)
    assert a.ok and a.statuses == {"completed": 80}, a.summary()


@pytest.mark.parametrize("redis_server", AOF, indirect=True)
def test_producer_rides_out_a_redis_restart(engine, redis_server):
    client = Client(redis_server.url)
    rid = client.enqueue("before", max_tokens=4)
    with _down_for(redis_server, 1.0):
        # The call blocks while Redis is away and succeeds once it is back (capped backoff, no exception).
        rid2 = client.enqueue("during", max_tokens=4)

    async def async_enqueue_across_restart() -> str:
        ac = AsyncClient(redis_server.url)
        await ac.enqueue("warm up", max_tokens=1)
        with _down_for(redis_server, 1.0):
            rid3 = await ac.enqueue("async during", max_tokens=4)
        await ac.aclose()
        return rid3

    rid3 = asyncio.run(async_enqueue_across_restart())
    with running_worker(engine, redis_server.url):
        got = client.result(rid, timeout=60)
        redis_server.restart()
        got2, got3 = client.result(rid2, timeout=60), client.result(rid3, timeout=60)
    assert got.status == got2.status == got3.status == "completed"


def test_worker_started_before_redis_waits_for_it(engine, redis_server):
    url = redis_server.url
    redis_server.stop()
    with running_worker(engine, url) as w:
        time.sleep(0.5)
        assert not w.stopping
        redis_server.start()
        client = Client(url)
        res = client.result(client.enqueue("late redis", max_tokens=4), timeout=60)
    assert res.status == "completed"


def test_connection_policy_is_shared_and_fails_fast_for_workers(redis_url):
    fast, patient = connect(redis_url, fail_fast=True), connect(redis_url)
    kw_fast, kw_patient = fast.connection_pool.connection_kwargs, patient.connection_pool.connection_kwargs
    assert kw_fast["retry"].get_retries() == 1 and kw_patient["retry"].get_retries() >= 10
    assert kw_patient["socket_keepalive"] and kw_patient["health_check_interval"] == 30
    assert kw_patient["socket_timeout"] > 1.0  # longer than the longest blocking read
    assert Client(redis_url).redis.connection_pool.connection_kwargs["retry"].get_retries() >= 10
