"""Cancellation and deadlines: queued jobs never start, running ones stop within one step and free their KV."""
from __future__ import annotations

import time

import pytest

from spool.engine import LLMEngine
from spool.producer import Client
from spool.protocol.connection import connect
from spool.protocol.keys import Keys
from spool.testing.chaos import audit, wait_for
from tests.worker_harness import running_worker
from spool.worker.loop import Worker
from spool.worker.settings import WorkerSettings

KEYS = Keys()


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=8)


def _manual_worker(engine, url: str) -> Worker:
    w = Worker(engine, connect(url, fail_fast=True), WorkerSettings(redis_url=url, name="manual", block_ms=20))
    assert w.start()
    return w


def test_cancel_queued_job_never_starts(engine, redis_url):
    client = Client(redis_url)
    rid = client.enqueue("never", max_tokens=50, stream=True)
    client.cancel(rid)
    keep = client.enqueue("keep", max_tokens=3)
    with running_worker(engine, redis_url):
        res, other = client.result(rid, timeout=30), client.result(keep, timeout=30)
    assert res.status == "cancelled" and res.error.code == "cancelled" and res.text == "" and not res.choices
    assert res.timings.started is None
    assert other.status == "completed"
    events = list(client.stream(rid, timeout=5))
    assert [e.type for e in events] == ["done"] and events[0].status == "cancelled"
    assert engine.block_manager.num_used_blocks == 0


def test_cancel_running_job_stops_within_one_step(engine, redis_url):
    client = Client(redis_url)
    rid = client.enqueue("stop me", max_tokens=400, ignore_eos=True, stream=True, n=3, seed=1)
    w = _manual_worker(engine, redis_url)
    base = engine.stats.generation_tokens
    wait_for(lambda: (w.tick(), engine.stats.generation_tokens >= base + 30)[1], 30, interval=0, what="tokens")
    assert engine.block_manager.num_used_blocks > 0
    steps = engine.stats.num_steps
    client.cancel(rid)
    w.tick()  # reads the cancel while a step computes and aborts; that step's collect reports the abort
    w.tick()  # publishes it while the next step computes; the outbox flushes the result
    assert engine.stats.num_steps - steps <= 2
    res = client.result(rid, timeout=0.5)
    assert res.status == "cancelled" and res.error.code == "cancelled"
    assert all(c.finish_reason == "abort" for c in res.choices) and len(res.choices) == 3
    assert 0 < res.usage.completion_tokens < 3 * 400 and res.text  # the partial text is kept
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert client.redis.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0
    assert audit(client.redis, KEYS, [rid]).ok


def test_cancel_many_running_and_queued_frees_every_block(engine, redis_url):
    client = Client(redis_url)
    ids = [client.enqueue(f"batch {i}", max_tokens=300, ignore_eos=True, n=1 + i % 3, seed=i) for i in range(24)]
    with running_worker(engine, redis_url) as w:
        base = engine.stats.generation_tokens
        wait_for(lambda: len(w.inflight) >= 4 and engine.stats.generation_tokens > base + 40, 30, what="running")
        for rid in ids:
            client.cancel(rid)
        results = [client.result(rid, timeout=30) for rid in ids]
    assert {r.status for r in results} == {"cancelled"}
    assert any(r.usage.completion_tokens > 0 for r in results)  # some were running
    assert any(r.usage.completion_tokens == 0 for r in results)  # some were still queued
    assert engine.block_manager.num_used_blocks == 0
    assert audit(client.redis, KEYS, ids).ok


def test_cancel_after_completion_changes_nothing(engine, redis_url):
    client = Client(redis_url)
    rid = client.enqueue("done already", max_tokens=3)
    with running_worker(engine, redis_url):
        first = client.result(rid, timeout=30)
        client.cancel(rid)
        time.sleep(0.3)
    assert client.result(rid).model_dump() == first.model_dump() and first.status == "completed"


def test_expired_job_is_not_started(engine, redis_url):
    client = Client(redis_url)
    rid = client.enqueue("too late", max_tokens=20, deadline=time.time() - 1)
    with running_worker(engine, redis_url):
        res = client.result(rid, timeout=30)
    assert res.status == "expired" and res.error.code == "deadline_exceeded" and res.timings.started is None
    assert res.usage.completion_tokens == 0


def test_deadline_passing_while_running_aborts_with_partial_text(engine, redis_url):
    client = Client(redis_url)
    deadline = time.time() + 1.0
    rid = client.enqueue("slowly", max_tokens=480, ignore_eos=True, deadline=deadline)
    w = _manual_worker(engine, redis_url)
    base = engine.stats.generation_tokens
    wait_for(lambda: (w.tick(), engine.stats.generation_tokens >= base + 5)[1], 30, interval=0, what="tokens")
    assert time.time() < deadline, "too slow to start before the deadline"
    time.sleep(max(0.0, deadline - time.time()) + 0.01)
    w.tick()  # notices the deadline and aborts; this tick's step reports the abort
    w.tick()  # and the next one publishes it
    res = client.result(rid, timeout=0.5)
    assert res.status == "expired" and res.error.code == "deadline_exceeded"
    assert res.finish_reason == "abort" and 0 < res.usage.completion_tokens < 480 and res.text
    assert res.timings.finished >= res.timings.started
    assert engine.block_manager.num_used_blocks == 0
