"""`spool top`: one frame (--once) of a real deployment, workers, backlog and a running batch with its ETA;
the live view refreshes in a terminal and quits on q."""
from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spool.producer.batch.state import BatchStore
from spool.producer.client import Client
from tests.worker_harness import running_worker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from spool.engine import LLMEngine

    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)


def running_batch(client: Client, batch_id: str, total: int, done: int, started_s_ago: float) -> None:
    """A batch in progress as a runner keeps it in Redis (spool.producer.batch.state)."""
    store = BatchStore(client.redis, client.keys)
    store.create(batch_id, total=total, completed=done, failed=0, tokens=done * 10)
    store.transition(batch_id, "in_progress", frm=("validating",))
    store.update(batch_id, in_progress_at=repr(time.time() - started_s_ago))


def test_once_shows_workers_backlog_and_batches(engine, redis_url):
    client = Client(redis_url)
    running_batch(client, "nightly-7", total=100, done=25, started_s_ago=60)
    with running_worker(engine, redis_url, name="gpu-a"):
        deadline = time.monotonic() + 20
        while not client.redis.exists("spool:worker:{gpu-a}") and time.monotonic() < deadline:
            time.sleep(0.05)
        out = subprocess.run([sys.executable, "-m", "spool", "top", "--once", "--redis-url", redis_url],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    client.enqueue("waits for a worker", id="late", priority="bulk")
    after = subprocess.run([sys.executable, "-m", "spool", "top", "--once", "--redis-url", redis_url],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    frame = out.stdout
    assert f"spool top  {redis_url}" in frame and "workers: 1" in frame
    row = next(line for line in frame.splitlines() if "gpu-a" in line)
    assert Path(engine.config.model).name in row and "cpu" in row and "%" in row
    assert "spool:jobs " in frame or "spool:jobs │" in frame
    batch = next(line for line in frame.splitlines() if "nightly-7" in line)
    assert "in_progress" in batch and "25/100 (25%)" in batch
    assert re.search(r"00:03:\d\d", batch), batch  # 75 left at 25 per minute
    assert after.returncode == 0 and "(no live worker)" in after.stdout
    bulk = next(line for line in after.stdout.splitlines() if "spool:jobs:bulk" in line)
    assert bulk.split("│")[2].strip() == "1"  # the backlog column


def test_live_view_refreshes_and_quits_on_q(redis_url):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "spool", "top", "--interval", "0.2", "--redis-url", redis_url],
                            stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, close_fds=True,
                            env=dict(os.environ, COLUMNS="120", LINES="40", TERM="xterm"))
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while seen.count(b"spool top") < 2 and time.monotonic() < deadline:  # at least one refresh in place
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
        os.write(leader, b"q")
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert seen.count(b"spool top") >= 2, seen[-2000:]
    assert code == 0
