"""The Redis worker end to end: real redis-server, real engine on the tiny model, real clients."""
from __future__ import annotations

import asyncio
import shutil
import subprocess

import orjson
import pytest

from spool.engine import LLMEngine
from spool.producer import AsyncClient, Client
from tests.worker_harness import running_worker


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=32)


def test_hundred_concurrent_jobs_stream_and_complete(engine, redis_url):
    client = Client(redis_url)
    jobs = [{"id": f"j{i}", "prompt": f"job number {i} says", "max_tokens": 8 + i % 7, "stream": True,
             "temperature": 0.7, "seed": i, "ignore_eos": True, "metadata": {"i": i}} for i in range(100)]
    ids = client.enqueue_many(jobs)
    with running_worker(engine, redis_url):
        results = {i: client.result(i, timeout=120) for i in ids}
    for i, rid in enumerate(ids):
        res = results[rid]
        assert res.status == "completed", res
        assert res.metadata == {"i": i}
        assert res.usage.completion_tokens == len(res.token_ids) == 8 + i % 7
        assert res.timings.enqueued <= res.timings.started <= res.timings.first_token <= res.timings.finished
        events = list(client.stream(rid, timeout=5))
        assert events[-1].type == "done" and events[-1].status == "completed"
        assert "".join(e.text for e in events if e.type == "delta") == res.text
        assert [t for e in events if e.type == "delta" for t in e.token_ids] == res.token_ids
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not installed")
def test_raw_xadd_from_redis_cli(engine, redis_server):
    port = str(redis_server.port)
    job = '{"id":"hello-1","prompt":"Once upon a time","max_tokens":16}'
    subprocess.run(["redis-cli", "-p", port, "XADD", "spool:jobs", "*", "job", job], check=True, capture_output=True)
    with running_worker(engine, redis_server.url):
        res = Client(redis_server.url).result("hello-1", timeout=60)
    raw = subprocess.run(["redis-cli", "-p", port, "GET", "spool:result:{hello-1}"], check=True,
                         capture_output=True).stdout
    doc = orjson.loads(raw)
    assert doc["id"] == "hello-1" and doc["status"] == "completed" and doc["text"] == res.text
    assert set(doc) >= {"id", "status", "text", "token_ids", "choices", "finish_reason", "usage", "error",
                        "timings", "metadata", "worker"}


def test_chat_and_n_and_prompt_token_ids(engine, redis_url):
    client = Client(redis_url)
    chat = client.enqueue(messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, ignore_eos=True)
    multi = client.enqueue("several", n=3, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    ids = client.enqueue(prompt_token_ids=[5, 6, 7, 8], max_tokens=4, temperature=0, ignore_eos=True)
    with running_worker(engine, redis_url):
        r_chat, r_multi, r_ids = (client.result(x, timeout=60) for x in (chat, multi, ids))
    rendered = engine.apply_chat_template([{"role": "user", "content": "hi"}])  # the template's own special tokens
    assert r_chat.status == "completed" and r_chat.usage.prompt_tokens == len(rendered["prompt_token_ids"])
    assert [c.index for c in r_multi.choices] == [0, 1, 2]
    assert r_multi.usage.completion_tokens == 18 and r_multi.text == r_multi.choices[0].text
    assert r_ids.usage.prompt_tokens == 4 and len(r_ids.token_ids) == 4


def test_invalid_jobs_fail_cleanly_while_good_jobs_flow(engine, redis_url):
    client = Client(redis_url)
    r = client.redis
    bad = {
        "bad-json": b'{"id":"bad-json", "prompt": ',
        "bad-field": orjson.dumps({"id": "bad-field", "prompt": "x", "colour": "red"}),
        "bad-temp": orjson.dumps({"id": "bad-temp", "prompt": "x", "temperature": -3}),
        "bad-two": orjson.dumps({"id": "bad-two", "prompt": "x", "prompt_token_ids": [1]}),
        "bad-long": orjson.dumps({"id": "bad-long", "prompt": "x", "max_tokens": 100000}),
        "bad-vocab": orjson.dumps({"id": "bad-vocab", "prompt_token_ids": [10**6]}),
    }
    good = []
    for i, (rid, raw) in enumerate(bad.items()):
        r.xadd("spool:jobs", {"job": raw})
        good.append(client.enqueue(f"good {i}", max_tokens=4))
    r.xadd("spool:jobs", {"not_job": b"x"})  # no id to answer to: dead letter
    with running_worker(engine, redis_url):
        for g in good:
            assert client.result(g, timeout=60).status == "completed"
        for rid in bad:
            res = client.result(rid, timeout=60)
            assert res.status == "failed" and res.error.code and res.error.message, res
        assert client.result("bad-json").error.code == "invalid_json"
        assert client.result("bad-field").error.code == "invalid_job"
        assert client.result("bad-vocab").error.code == "invalid_prompt"
    dead = r.xrange("spool:dead")
    assert len(dead) == 1 and b"missing_job_field" in dead[0][1][b"reason"]
    assert r.xpending("spool:jobs", "workers")["pending"] == 0


def test_graceful_shutdown_leaves_pending_for_next_worker(engine, tiny_llama, redis_url):
    client = Client(redis_url)
    ids = [client.enqueue(f"long {i}", max_tokens=200, ignore_eos=True, temperature=0) for i in range(6)]
    with running_worker(engine, redis_url, name="first", grace_period_s=0.0, claim_idle_ms=300) as w:
        import time

        deadline = time.time() + 30
        while not w.inflight and time.time() < deadline:
            time.sleep(0.05)
        assert w.inflight
    pending = client.redis.xpending("spool:jobs", "workers")
    assert pending["pending"] == 6 and all(client.status(i) != "completed" for i in ids)
    second = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=32)
    with running_worker(second, redis_url, name="second", claim_idle_ms=300):
        results = [client.result(i, timeout=120) for i in ids]
    assert all(r.status == "completed" and len(r.token_ids) == 200 for r in results)
    assert all(r.worker == "second" for r in results)
    assert client.redis.xpending("spool:jobs", "workers")["pending"] == 0


def test_async_client_streams(engine, redis_url):
    async def main():
        ac = AsyncClient(redis_url)
        rid = await ac.enqueue("async please", stream=True, max_tokens=10, ignore_eos=True)
        text, done = "", None
        async for ev in ac.stream(rid, timeout=60):
            if ev.type == "delta":
                text += ev.text
            elif ev.type == "done":
                done = ev
        res = await ac.result(rid, timeout=10)
        await ac.aclose()
        return text, done, res

    with running_worker(engine, redis_url):
        text, done, res = asyncio.run(main())
    assert done.status == "completed" and text == res.text and len(res.token_ids) == 10
