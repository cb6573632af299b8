"""Redis at maxmemory with noeviction (real redis-server, the real worker loop): an enqueue fails at once with
RedisFullError (the CLI: one line, exit 4); the worker keeps the results of the jobs it holds, reads nothing
new while its writes are refused, and writes everything once memory frees; nothing is lost or doubled."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from spool.engine import LLMEngine
from spool.producer import Client, RedisFullError
from spool.protocol import Keys
from spool.testing.chaos import ROOT, count_results, wait_for
from spool.testing.history import History, check, summary
from tests.worker_harness import running_worker

KEYS = Keys()


def test_full_redis_refuses_enqueues_and_the_worker_holds_its_results_until_memory_frees(tiny_llama, redis_server):
    client, history, admin = Client(redis_server.url), History(), redis_server.client()
    engine = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4)
    jobs = [{"id": f"m{i}", "prompt": f"memory {i}", "max_tokens": 120, "ignore_eos": True, "stream": i % 2 == 0,
             "seed": i} for i in range(10)]
    with running_worker(engine, redis_server.url, name="mem", claim_idle_ms=60_000) as w:
        ids = client.enqueue_many(jobs)
        for job in jobs:
            history.acknowledged(job["id"], streamed=job["stream"])
        wait_for(lambda: len(w.inflight) == 4, 30, interval=0.01, what="4 jobs running")
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # every write that may grow memory is refused from now on
        try:
            with pytest.raises(RedisFullError, match="out of memory") as refused:
                client.enqueue("no room", id="refused-1", max_tokens=3)
            assert "\n" not in str(refused.value)
            with pytest.raises(RedisFullError) as refused_many:
                client.enqueue_many([{"prompt": "no room either", "max_tokens": 3} for _ in range(3)])
            assert refused_many.value.enqueued == []  # no chunk went in before the refused one
            cli = subprocess.run([sys.executable, "-m", "spool", "enqueue", "--redis-url", redis_server.url, "no room"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert cli.returncode == 4, cli
            assert len(cli.stderr.strip().splitlines()) == 1 and "out of memory" in cli.stderr, cli.stderr
            # The running jobs finish; their results wait in the worker, and nothing new is read meanwhile.
            wait_for(lambda: not w.inflight, 60, what="the running jobs to finish")
            time.sleep(1.0)
            assert w.jobs_done == 4 and len(w.outbox) > 0 and not w.inflight
            assert count_results(admin, KEYS, ids) == 0
            assert admin.xpending(KEYS.jobs(), KEYS.group)["pending"] == 4  # the other 6 are still unread
        finally:
            admin.config_set("maxmemory", 0)
        wait_for(lambda: count_results(admin, KEYS, ids) == len(ids), 60, interval=0.1, what="all results")
        assert client.enqueue("room again", id="after-1", max_tokens=3) == "after-1"
        history.acknowledged("after-1")
        assert client.result("after-1", timeout=30).status == "completed"
    problems = check(history, admin, KEYS)
    assert not problems, summary(problems)
    assert {client.result(rid).status for rid in ids} == {"completed"}
    assert client.status("refused-1") == "unknown"
    assert admin.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0
