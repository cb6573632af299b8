"""Every Redis call of the worker may fail, before or after Redis ran it: nothing crashes, nothing doubles."""
from __future__ import annotations

import random
import threading

import redis

from spool.engine import LLMEngine
from spool.producer import Client
from spool.protocol.connection import connect
from spool.protocol.keys import Keys
from spool.testing.chaos import audit, count_results, wait_for
from spool.worker.loop import Worker
from spool.worker.settings import WorkerSettings

KEYS = Keys()


class Flaky:
    """A redis.Redis stand-in whose calls raise ConnectionError at random: before the command reaches Redis,
    or after it ran (the reply was lost), which is what a dropped connection does."""

    def __init__(self, real: redis.Redis, rng: random.Random, before: float, after: float):
        self._real, self._rng, self._before, self._after = real, rng, before, after
        self.injected = 0

    def _call(self, fn, *args, **kwargs):
        if self._rng.random() < self._before:
            self.injected += 1
            raise redis.ConnectionError("injected: connection lost before the command")
        out = fn(*args, **kwargs)
        if self._rng.random() < self._after:
            self.injected += 1
            raise redis.ConnectionError("injected: connection lost before the reply")
        return out

    def pipeline(self, *args, **kwargs):
        pipe = self._real.pipeline(*args, **kwargs)
        execute = pipe.execute
        pipe.execute = lambda *a, **k: self._call(execute, *a, **k)
        return pipe

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        return (lambda *a, **k: self._call(attr, *a, **k)) if callable(attr) else attr


def test_worker_survives_random_redis_failures_everywhere(tiny_llama, redis_url):
    client = Client(redis_url)
    r = client.redis
    # Some jobs were held by a consumer that died, so the reclaim path runs under faults too.
    held = client.enqueue_many([{"id": f"held{i}", "prompt": "held", "max_tokens": 8} for i in range(6)])
    r.xgroup_create(KEYS.jobs(), KEYS.group, id="0", mkstream=True)
    r.xreadgroup(KEYS.group, "dead-one", {KEYS.jobs(): ">"}, count=10)
    ids = held + client.enqueue_many([
        {"id": f"f{i}", "prompt": f"flaky {i}", "max_tokens": 10 + i % 15, "ignore_eos": True, "stream": i % 2 == 0,
         "n": 1 + i % 2, "seed": i} for i in range(80)])
    for i in range(0, 80, 10):
        client.cancel(f"f{i}")  # some before they start, some (by the cancels stream) while they run
    engine = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=6)
    flaky = Flaky(connect(redis_url, fail_fast=True), random.Random(5), before=0.12, after=0.06)
    w = Worker(engine, flaky, WorkerSettings(redis_url=redis_url, name="flaky", claim_idle_ms=300, block_ms=50,
                                              heartbeat_s=0.2))
    errors = []

    def run():
        try:
            w.run()
        except BaseException as e:  # noqa: BLE001 - the point of the test: report, don't hide
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        wait_for(lambda: count_results(r, KEYS, ids) == len(ids) or errors, 120, interval=0.1, what="all results")
        wait_for(lambda: not w.inflight or errors, 30, what="idle")
    finally:
        w.request_stop()
        t.join(60)
    assert not errors, errors
    assert flaky.injected > 20
    a = audit(r, KEYS, ids)
    assert a.ok, a.summary()  # one result and one done each, though transactions were re-sent
    assert a.statuses.get("cancelled", 0) >= 1 and a.statuses["completed"] >= 60
    unexpected = {i: a.codes[i] for i in ids if a.codes.get(i) not in (None, "cancelled")}
    assert not unexpected, unexpected  # no poison_job: Redis errors are not worker deaths
    wait_for(lambda: r.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0, 30, what="nothing pending")
    assert engine.block_manager.num_used_blocks == 0
