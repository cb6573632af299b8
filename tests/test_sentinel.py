"""Sentinel: workers and clients through redis+sentinel:// URLs, and a failover mid-run with durable enqueues."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from spool.engine import LLMEngine
from spool.producer import Client
from spool.protocol import JobError
from spool.protocol.connection import connect, parse_sentinel_url, redact_url, sentinel_url_from_env
from spool.protocol.keys import Keys
from spool.testing import history
from spool.testing.redis_sentinel import MASTER_NAME, SentinelSet
from tests.worker_harness import running_worker

KEYS = Keys()


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory):
    with SentinelSet(tmp_path_factory.mktemp("sentinel")) as s:
        yield s


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=8)


def test_sentinel_urls_and_environment():
    sentinels, master, kw = parse_sentinel_url("redis+sentinel://:s3cret@h1:26379,h2:26380/mymaster/2")
    assert sentinels == [("h1", 26379), ("h2", 26380)] and master == "mymaster"
    assert kw == {"password": "s3cret", "db": 2}
    _, _, kw = parse_sentinel_url("redis+sentinel://h1:1/m?sentinel_password=1234&socket_timeout=3")
    assert kw == {"sentinel_password": "1234", "socket_timeout": 3}
    assert "1234" not in redact_url("redis+sentinel://h1:1/m?sentinel_password=1234")
    assert sentinel_url_from_env({"SPOOL_REDIS_SENTINELS": "a:1,b:2", "SPOOL_REDIS_MASTER": "m"}) == \
        "redis+sentinel://a:1,b:2/m"
    assert sentinel_url_from_env({}) is None
    with pytest.raises(ValueError, match="SPOOL_REDIS_MASTER"):
        sentinel_url_from_env({"SPOOL_REDIS_SENTINELS": "a:1"})


def test_failover_mid_run_with_durable_enqueues_loses_no_acknowledged_job(engine, sentinel_set):
    url = sentinel_set.url
    client = Client(url, durable=True)
    hist = history.History()
    stop = threading.Event()
    errors: list[str] = []

    def produce() -> None:
        i = 0
        while not stop.is_set():
            rid = f"f{i}"
            try:
                client.enqueue(f"failover {i}", id=rid, max_tokens=4, ignore_eos=True, stream=i % 2 == 0)
                hist.acknowledged(rid, i % 2 == 0)
            except (JobError, redis.RedisError) as e:  # not acknowledged: no promise made for this one
                errors.append(f"{rid}: {e}")
            i += 1
            time.sleep(0.01)

    with running_worker(engine, url, claim_idle_ms=2000) as w:
        producer = threading.Thread(target=produce)
        producer.start()
        deadline = time.monotonic() + 30
        while len(hist.enqueued) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        old = sentinel_set.master_server()
        new = sentinel_set.failover()
        assert new is not old
        after = len(hist.enqueued)
        while len(hist.enqueued) < after + 20 and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        stop.set()
        producer.join(30)
        for rid in list(hist.enqueued):
            hist.read(client.result(rid, timeout=60))
        assert not w.stopping
    r = connect(url)
    assert r.connection_pool.get_master_address()[1] == new.port
    problems = history.check(hist, r, KEYS)
    assert not problems, history.summary(problems)
    assert len(hist.enqueued) >= 40, errors
    assert all(res[0].status == "completed" for res in hist.results.values())


def test_durable_enqueue_without_a_replica_says_so(tmp_path):
    with SentinelSet(tmp_path / "lonely", replicas=0) as s:
        client = Client(s.url, durable=True)
        with pytest.raises(JobError) as info:
            client.enqueue("nobody copies me", id="lonely-1", max_tokens=1)
        assert info.value.code == "not_replicated" and info.value.id == "lonely-1"
        assert "no replica acknowledged" in info.value.message
        assert client.status("lonely-1") == "queued"  # the job exists on the master: the error says so
