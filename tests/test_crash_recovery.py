"""Crash recovery: SIGKILLed workers lose nothing, leases keep live jobs, duplicate runs never double a result."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from spool.engine import LLMEngine
from spool.producer import Client
from spool.protocol.connection import connect
from spool.protocol.keys import Keys
from spool.testing.chaos import WorkerProcess, audit, count_results, wait_for
from tests.worker_harness import running_worker
from spool.worker.loop import Worker
from spool.worker.settings import WorkerSettings

KEYS = Keys()


def _live_text(client: Client, rid: str) -> tuple[int, str]:
    """What a tailer shows: (restart events seen, text of the deltas after the last restart)."""
    restarts, text = 0, []
    for ev in client.stream(rid, timeout=10):
        if ev.type == "restart":
            restarts, text = restarts + 1, []  # drop the partial output of the run that died
        elif ev.type == "delta":
            text.append(ev.text)
    return restarts, "".join(text)


def _engine(model, **kw):
    return LLMEngine.from_kwargs(str(model), device="cpu", block_size=8, **{"max_num_seqs": 8, **kw})


def test_sigkill_one_of_two_workers_loses_nothing(tiny_llama, redis_server, tmp_path):
    client = Client(redis_server.url)
    r = client.redis
    w1 = WorkerProcess(tiny_llama, redis_server.url, "w1", tmp_path).start()
    w2 = WorkerProcess(tiny_llama, redis_server.url, "w2", tmp_path).start()
    try:
        jobs = [{"id": f"k{i}", "prompt": f"crash test {i}", "max_tokens": 30 + i % 20, "ignore_eos": True,
                 "temperature": 0.8, "seed": i, "stream": i % 2 == 0} for i in range(200)]
        ids = client.enqueue_many(jobs)
        # Kill w1 once both are really working: it then holds max_num_seqs jobs mid-generation. (On a loaded
        # machine w1 may start after w2 has done the first 30, so wait for w1's own jobs too.)
        def w1_pending():
            return r.xpending_range(KEYS.jobs(), KEYS.group, "-", "+", 100, consumername="w1")

        wait_for(lambda: count_results(r, KEYS, ids) >= 30 and w1_pending(), 60, what="30 results, w1 holding jobs")
        pending = w1_pending()
        assert pending, "w1 held no jobs when killed: the test would prove nothing"
        w1.kill()
        killed_with = [p["message_id"] for p in pending]
        wait_for(lambda: count_results(r, KEYS, ids) == len(ids), 60, interval=0.2, what="all 200 results")
        a = audit(r, KEYS, ids)
        assert a.ok, (a.summary(), w2.log_tail())
        assert a.statuses == {"completed": 200}
        assert a.restarts >= 1  # w2 took over w1's jobs and told their tailers
        for rid in (f"k{i}" for i in range(0, 200, 2)):  # the streaming ones: what a tailer ends up with
            restarts, text = _live_text(client, rid)
            assert text == client.result(rid).text, rid
        assert r.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0
        assert int(r.hget(KEYS.stats, "duplicate_finals") or 0) == 0
        assert killed_with
    finally:
        w1.kill()
        assert w2.alive, w2.log_tail()
        w2.stop()


def test_restarted_worker_takes_its_own_pending_jobs_back_at_once(tiny_llama, redis_url):
    client = Client(redis_url)
    r = client.redis
    ids = [client.enqueue(f"orphan {i}", max_tokens=6, ignore_eos=True, stream=True) for i in range(3)]
    r.xgroup_create(KEYS.jobs(), KEYS.group, id="0", mkstream=True)
    # A previous process named "same" read them and died (nothing acked).
    r.xreadgroup(KEYS.group, "same", {KEYS.jobs(): ">"}, count=10)
    t0 = time.monotonic()
    # claim_idle_ms of a minute: only the start-up recovery can pick them up this fast.
    with running_worker(_engine(tiny_llama), redis_url, name="same", claim_idle_ms=60_000):
        results = [client.result(i, timeout=30) for i in ids]
    assert time.monotonic() - t0 < 30
    assert all(res.status == "completed" for res in results)
    a = audit(r, KEYS, ids)
    assert a.ok and a.restarts == 3
    assert all(_live_text(client, rid) == (1, res.text) for rid, res in zip(ids, results))


def test_live_worker_keeps_a_long_generation_longer_than_claim_idle(tiny_llama, redis_url):
    client = Client(redis_url)
    rid = client.enqueue("a long one", max_tokens=490, ignore_eos=True, temperature=0, stream=True)
    with running_worker(_engine(tiny_llama), redis_url, name="owner", claim_idle_ms=150):
        wait_for(lambda: client.status(rid) == "running", 30, what="running")
        # The owner is alive, so a second worker must never steal the job, however long it runs.
        with running_worker(_engine(tiny_llama), redis_url, name="thief", claim_idle_ms=150):
            res = client.result(rid, timeout=60)
    assert res.status == "completed" and res.worker == "owner" and len(res.token_ids) == 490
    assert res.timings.finished - res.timings.started > 3 * 0.150, "too fast to prove the lease works"
    a = audit(client.redis, KEYS, [rid])
    assert a.ok and a.restarts == 0


def test_stalled_worker_drops_its_run_once_another_took_the_job(tiny_llama, redis_url):
    client = Client(redis_url)
    rid = client.enqueue("stall", max_tokens=400, ignore_eos=True, temperature=0, stream=True)
    eng = _engine(tiny_llama)
    stalled = Worker(eng, connect(redis_url, fail_fast=True),
                     WorkerSettings(redis_url=redis_url, name="stalled", claim_idle_ms=300, block_ms=50))
    assert stalled.start()
    wait_for(lambda: (stalled.tick(), eng.stats.generation_tokens > 5)[1], 30, interval=0, what="tokens")
    # Now it freezes (a long GC pause, a hung device): no ticks, no lease refresh.
    with running_worker(_engine(tiny_llama), redis_url, name="rescuer", claim_idle_ms=300):
        res = client.result(rid, timeout=60)
    assert res.worker == "rescuer" and res.status == "completed"
    deadline = time.monotonic() + 10
    while (stalled.inflight or eng.has_unfinished_requests()) and time.monotonic() < deadline:
        stalled.tick()  # it wakes up, sees the job is not its own any more, and drops it
    assert not stalled.inflight and eng.block_manager.num_used_blocks == 0
    assert stalled.finisher.finals_queued == 0
    a = audit(client.redis, KEYS, [rid])
    assert a.ok and a.restarts == 1
    assert client.redis.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0


def test_same_id_run_twice_at_once_has_one_final_result(tiny_llama, redis_url):
    r = connect(redis_url)
    client = Client(redis_url)
    # Two entries with one id, read by two workers at the same time: both run it, the first final wins.
    for _ in range(2):
        r.xadd(KEYS.jobs(), {"job": b'{"id":"twice","prompt":"same id","max_tokens":40,"ignore_eos":true}'})
    e1, e2 = _engine(tiny_llama), _engine(tiny_llama)
    w1 = Worker(e1, connect(redis_url, fail_fast=True), WorkerSettings(redis_url=redis_url, name="a", block_ms=50))
    w2 = Worker(e2, connect(redis_url, fail_fast=True), WorkerSettings(redis_url=redis_url, name="b", block_ms=50))
    assert w1.start() and w2.start()
    w1.settings.max_jobs = w2.settings.max_jobs = 1  # each reads exactly one entry
    w1.tick()
    w2.tick()
    assert w1.inflight and w2.inflight
    for w in (w1, w2):
        threading.Thread(target=w.run, daemon=True).start()
    res = client.result("twice", timeout=60)
    wait_for(lambda: not w1.inflight and not w2.inflight and not len(w1.outbox) and not len(w2.outbox), 30)
    assert res.status == "completed"
    assert w1.finisher.finals_won + w2.finisher.finals_won == 1
    assert w1.finisher.finals_lost + w2.finisher.finals_lost == 1
    assert int(r.hget(KEYS.stats, "duplicate_finals")) == 1
    assert audit(r, KEYS, ["twice"]).ok
    assert r.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_finalize_script_first_write_wins(redis_url, status):
    from spool.protocol import Result
    from spool.protocol.scripts import FINALIZE

    r = connect(redis_url)
    r.set(KEYS.status("x"), "running")
    replies = []
    for n in range(3):
        res = Result(id="x", status=status, worker=f"w{n}")
        name, args, _ = FINALIZE.eval_cmd(
            [KEYS.result("x"), KEYS.tokens("x"), KEYS.status("x"), KEYS.digest("x"), KEYS.quarantine("x")],
            [res.to_json(), 60, 100, 60, f"run{n}", -1, 0, "type", "done", "data", b"{}"])
        replies.append(getattr(r, name)(*args))
    assert replies == [1, 0, 0]
    assert Result.from_json(r.get(KEYS.result("x"))).worker == "w0"
    assert [f[b"type"] for _, f in r.xrange(KEYS.tokens("x"))] == [b"done"]
    assert r.get(KEYS.status("x")) is None  # the duplicate_finals counter is the worker's (spool.worker.finish)
    assert 0 < r.ttl(KEYS.result("x")) <= 60 and 0 < r.ttl(KEYS.tokens("x")) <= 60


def test_second_sigterm_stops_at_once_and_leaves_jobs_pending(tiny_llama, redis_server, tmp_path):
    """Warm stop on the first SIGTERM (grace period 60 s here); a second one is a cold stop, as in RQ."""
    client = Client(redis_server.url)
    r = client.redis
    w = WorkerProcess(tiny_llama, redis_server.url, "cold", tmp_path, "--grace-period-s", "60",
                      max_num_seqs=16).start()
    try:
        # 16 sequences of 480 tokens (the tiny model's context is 512): several seconds of work on a CPU.
        ids = client.enqueue_many([{"id": f"cold{i}", "prompt": f"job {i}", "max_tokens": 480,
                                    "ignore_eos": True, "temperature": 0} for i in range(16)])
        wait_for(lambda: all(client.status(i) == "running" for i in ids), 60, what="jobs running")
        w.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert w.alive, w.log_tail()  # warm stop: still finishing its jobs
        started = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(timeout=30) == 0, w.log_tail()
        assert time.monotonic() - started < 30
        assert "second stop signal" in w.log_tail(50)
        assert count_results(r, KEYS, ids) == 0  # nothing finished: all of them stay pending for another worker
        assert r.xpending(KEYS.jobs(), KEYS.group)["pending"] == 16
    finally:
        w.kill()
