"""Network faults between a real `spool worker` (and a producer) and a real redis-server, through
spool.testing.tcp_proxy: added latency, stalls, connection resets and half-open connections. The worker
never hangs (each fault costs at most its Redis timeout), nothing is lost, every job has exactly one final
result and every stream equals its result (spool.testing.history)."""
from __future__ import annotations

import threading
import time

import pytest

from spool.producer import Client
from spool.protocol import Keys
from spool.protocol.connection import connect
from spool.testing.chaos import WorkerProcess, count_results, wait_for
from spool.testing.history import History, check, summary
from spool.testing.tcp_proxy import FaultProxy

KEYS = Keys()
REDIS_TIMEOUT_S = 1.0  # the worker's --redis-timeout-s: how long a dead connection may hold it up


@pytest.fixture
def proxy(redis_server):
    p = FaultProxy("127.0.0.1", redis_server.port).start()
    yield p
    p.close()


def test_worker_and_producer_ride_out_latency_stalls_resets_and_half_open_connections(tiny_llama, redis_server,
                                                                                    proxy, tmp_path):
    direct, history = Client(redis_server.url), History()
    # The producer talks through the proxy too, with a short socket timeout so it retries on a new connection.
    producer = Client(proxy.url, connection=connect(proxy.url, socket_timeout=REDIS_TIMEOUT_S))
    w = WorkerProcess(tiny_llama, proxy.url, "net", tmp_path, "--redis-timeout-s", str(REDIS_TIMEOUT_S),
                      max_num_seqs=6).start()
    waves: list[list[str]] = []

    def wave(name: str) -> list[str]:
        jobs = [{"id": f"{name}{i}", "prompt": f"{name} {i}", "max_tokens": 40, "ignore_eos": True,
                 "stream": i % 2 == 0, "seed": i} for i in range(6)]
        ids = producer.enqueue_many(jobs)
        for job in jobs:
            history.acknowledged(job["id"], streamed=job["stream"])
        waves.append(ids)
        return ids

    def done_within(ids: list[str], seconds: float, what: str) -> None:
        wait_for(lambda: count_results(direct.redis, KEYS, ids) == len(ids), seconds, interval=0.1, what=what)

    try:
        done_within(wave("warm"), 60, "the first wave (model loading)")

        proxy.latency_s = 0.03  # 30 ms each way on every read and write
        done_within(wave("slow"), 30, "results under 60 ms round trips")
        proxy.latency_s = 0.0

        ids = wave("stall")
        wait_for(lambda: direct.status(ids[0]) == "running", 20, what="stall wave running")
        proxy.stall()  # past the worker's Redis timeout: its calls time out, it reconnects, still stalled
        late = {}
        enqueue = threading.Thread(target=lambda: late.update(id=producer.enqueue("late", id="late-1",
                                                                                  max_tokens=5)))
        enqueue.start()  # the producer's first send is held by the stall and delivered late, after its resend
        time.sleep(3 * REDIS_TIMEOUT_S)
        proxy.resume()
        enqueue.join(30)
        assert late.get("id") == "late-1"
        history.acknowledged("late-1")
        done_within(ids + ["late-1"], 30, "results after the stall")

        ids = wave("reset")
        for _ in range(5):  # RST on every connection, worker and producer alike, while the wave runs
            time.sleep(0.3)
            proxy.reset()
        done_within(ids, 30, "results after resets")

        ids = wave("vanish")
        wait_for(lambda: direct.status(ids[0]) == "running", 20, what="vanish wave running")
        started, connections = time.monotonic(), proxy.connections_total
        assert proxy.vanish() >= 1  # the worker's connections go silent for ever; it must not wait on them
        done_within(ids, 30, "results after half-open connections")
        # Bounded by the Redis timeout (and a few retries), not by TCP's minutes-long give-up.
        assert time.monotonic() - started < 20
        assert proxy.connections_total > connections  # the silent connections were given up and replaced

        assert w.alive, w.log_tail()
        problems = check(history, direct.redis, KEYS)
        assert not problems, summary(problems) + "\n" + w.log_tail()
        assert direct.redis.xinfo_stream(KEYS.jobs())["entries-added"] == sum(map(len, waves)) + 1  # no double
        assert {direct.result(rid).status for ids in waves for rid in ids} == {"completed"}
        wait_for(lambda: direct.redis.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0, 10, what="all acked")
        assert proxy.connections_total > 5  # the faults really made both sides reconnect
        log = w.log_path.read_text()
        assert "Timeout" in log or "timed out" in log, "the stall never hit the worker: the test proved nothing"
    finally:
        w.kill()
