"""Run a real Worker (real engine, real redis-server) in a background thread for tests."""
from __future__ import annotations

import threading
from contextlib import contextmanager

from spool.protocol.connection import connect
from spool.worker.loop import Worker
from spool.worker.settings import WorkerSettings


@contextmanager
def running_worker(engine, url: str, **settings):
    """Start a worker thread on `engine`; on exit stop it gracefully and join it."""
    s = WorkerSettings(**{"redis_url": url, "block_ms": 100, "heartbeat_s": 0.5, **settings})
    w = Worker(engine, connect(url, fail_fast=True), s)
    t = threading.Thread(target=w.run, name=f"worker-{s.name}", daemon=True)
    t.start()
    try:
        yield w
    finally:
        w.request_stop()
        t.join(timeout=60)
        assert not t.is_alive(), "worker did not stop"
