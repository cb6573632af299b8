"""Poison jobs go to spool:dead with a failed result; `spool dead list` / `spool dead retry` inspect and requeue.

A job is poison only on evidence (spool.worker.quarantine): delivered too often makes it a suspect that runs
alone, and only workers dying while it ran alone condemn it."""
from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from spool.engine import LLMEngine
from spool.producer import Client
from spool.producer.admin import DeadLetterError, list_dead, retry_dead
from spool.protocol.keys import Keys
from spool.testing.chaos import ROOT, audit, wait_for
from tests.worker_harness import running_worker

KEYS = Keys()


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=8)


def _spool(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spool", *args, "--redis-url", url], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def _die_holding_it(r, times: int) -> None:
    """Deliver every pending job to a consumer that then dies, `times` times (what a crash loop does)."""
    r.xgroup_create(KEYS.jobs(), KEYS.group, id="0", mkstream=True)
    r.xreadgroup(KEYS.group, "ghost-0", {KEYS.jobs(): ">"}, count=100)
    for n in range(1, times):
        # XCLAIM (not JUSTID) counts a delivery, exactly as XAUTOCLAIM does when a worker takes a job over.
        ids = [p["message_id"] for p in r.xpending_range(KEYS.jobs(), KEYS.group, "-", "+", 100)]
        r.xclaim(KEYS.jobs(), KEYS.group, f"ghost-{n}", 0, ids)


def _died_alone(r, rid: str, deaths_before: int) -> None:
    """Record what a crash loop leaves: `deaths_before` deaths while the job ran alone, and a runner (a
    worker that was running it alone) that never finished it: it died too."""
    r.hset(KEYS.quarantine(rid), mapping={"deaths": deaths_before, "died_on": "ghost-1", "runner": "ghost-2"})


def test_poison_job_is_dead_lettered_then_retried(engine, redis_url):
    client = Client(redis_url)
    r = client.redis
    poison = client.enqueue("I crash workers", max_tokens=5, stream=True, metadata={"k": 1})
    survivor = client.enqueue("so do I", max_tokens=5, id="also-poison")
    unlucky = client.enqueue("I was only beside them", max_tokens=5, id="unlucky")
    _die_holding_it(r, times=3)  # all delivered 3 times; the next take-over makes it 4 > max_deliveries=3
    _died_alone(r, poison, 1)
    _died_alone(r, survivor, 1)  # `unlucky` has deliveries but no death while alone: no evidence
    with running_worker(engine, redis_url, claim_idle_ms=200, max_deliveries=3, max_quarantine_deaths=2):
        res = client.result(poison, timeout=30)
        ok = client.result(survivor, timeout=30)
        spared = client.result(unlucky, timeout=30)
    assert res.status == "failed" and res.error.code == "poison_job"
    assert "died 2 times while this job ran alone" in res.error.message and "after 4 deliveries" in res.error.message
    assert res.metadata == {"k": 1}
    assert ok.status == "failed" and ok.error.code == "poison_job"  # same history, same verdict
    assert spared.status == "completed"  # run in quarantine, alone, and it finished
    rows = list_dead(r, KEYS)
    assert {row["id"] for row in rows} == {poison, survivor}
    row = next(row for row in rows if row["id"] == poison)
    assert row["deliveries"] == "4" and "died 2 times" in row["reason"] and row["stream"] == KEYS.jobs()
    assert orjson.loads(row["job"])["id"] == poison

    listed = _spool(redis_url, "dead", "list")
    assert listed.returncode == 0 and poison in listed.stdout
    retried = _spool(redis_url, "dead", "retry", row["dead_id"])
    assert retried.returncode == 0 and "requeued as" in retried.stdout, retried.stderr
    assert client.status(poison) == "queued"
    with running_worker(engine, redis_url):
        again = client.result(poison, timeout=30)
    assert again.status == "completed" and again.metadata == {"k": 1}
    assert not r.exists(KEYS.quarantine(poison))  # retried: its record went, and the finished run cleared it
    assert audit(r, KEYS, [poison]).ok  # the old done entry went with the old result
    assert [row["id"] for row in list_dead(r, KEYS)] == [survivor]
    assert r.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0


def test_dead_retry_refuses_what_it_cannot_requeue(redis_url):
    r = Client(redis_url).redis
    missing = _spool(redis_url, "dead", "retry", "1-1")
    assert missing.returncode == 1 and "no dead letter" in missing.stderr
    assert _spool(redis_url, "dead", "retry", "not-an-id").returncode == 1
    no_job = r.xadd(KEYS.dead, {"reason": "missing_job_field: x", "id": "", "stream": KEYS.jobs()}).decode()
    with pytest.raises(DeadLetterError, match="no job document"):
        retry_dead(r, KEYS, no_job)
    elsewhere = r.xadd(KEYS.dead, {"job": b"{}", "id": "", "stream": "someone:else"}).decode()
    with pytest.raises(DeadLetterError, match="not a jobs stream"):
        retry_dead(r, KEYS, elsewhere)


def test_unidentifiable_entries_are_dead_lettered_not_fatal(engine, redis_url):
    client = Client(redis_url)
    r = client.redis
    r.xadd(KEYS.jobs(), {"payload": b"\x00" * 10})
    r.xadd(KEYS.jobs(), {"job": b"\xff" * (3 << 20)})  # 3 MiB of garbage: kept only up to max_job_bytes
    with running_worker(engine, redis_url):
        wait_for(lambda: r.xlen(KEYS.dead) == 2, 30, what="two dead letters")
        assert client.result(client.enqueue("still alive", max_tokens=2), timeout=30).status == "completed"
    rows = list_dead(r, KEYS)
    assert rows[0]["reason"].startswith("missing_job_field:") and rows[1]["reason"].startswith("too_large:")
    assert rows[1]["job_truncated_from"] == str(3 << 20)
    assert r.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0
