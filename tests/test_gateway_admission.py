"""Admission in `spool serve` (two server processes, `--workers 2`): 503 when no worker is alive after
--no-worker-timeout, 429 with Retry-After over --max-backlog, the priority override, the request timeout."""
from __future__ import annotations

import time
import urllib.request

import openai
import orjson
import pytest

from spool.producer import Client
from spool.testing.gateway import GatewayProcess

HI = [{"role": "user", "content": "hi"}]


def fake_worker(r, gateway: GatewayProcess) -> None:
    """Write a live worker's heartbeat (as `spool worker` does, model /models/fake-7b) and wait until the gateway
    lists its model."""
    r.hset("spool:worker:{w-fake}", mapping={"model": orjson.dumps("/models/fake-7b")})
    r.expire("spool:worker:{w-fake}", 60)
    r.sadd("spool:workers", "w-fake")
    models = urllib.request.Request(gateway.base_url + "/models",
                                    headers={"Authorization": f"Bearer {gateway.api_key}"})
    end = time.monotonic() + 10
    while not orjson.loads(urllib.request.urlopen(models, timeout=5).read())["data"]:
        assert time.monotonic() < end
        time.sleep(0.1)


def test_no_worker_503_then_backlog_429_priority_and_timeout(redis_server, tmp_path):
    gateway = GatewayProcess(redis_server.url, tmp_path, "--no-worker-timeout", "0.5", "--max-backlog", "2",
                             "--retry-after", "3", "--request-timeout", "1", "--workers", "2").start()
    try:
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.api_key, max_retries=0, timeout=30)
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            sdk.chat.completions.create(model="any", messages=HI, max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "no_worker" and time.monotonic() - start >= 0.5
        assert e.value.response.headers["retry-after"] == "3"
        client = Client(redis_server.url)
        assert client.redis.xlen("spool:jobs") == 0  # refused before anything was enqueued

        # A worker's heartbeat (as `spool worker` writes it) and a full interactive queue.
        r = client.redis
        for _ in range(2):
            client.enqueue("queued", max_tokens=1)
        fake_worker(r, gateway)
        time.sleep(1.2)  # both server processes have read the new state
        with pytest.raises(openai.RateLimitError) as e:
            sdk.chat.completions.create(model="fake-7b", messages=HI, max_tokens=2)  # the directory's name works
        assert e.value.status_code == 429 and e.value.code == "queue_full"
        assert e.value.response.headers["retry-after"] == "3"
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="other-model", messages=HI, max_tokens=2)

        # bulk is judged by its own stream: admitted, enqueued there, and cancelled at --request-timeout (504).
        with pytest.raises(openai.InternalServerError) as e:
            sdk.chat.completions.create(model="/models/fake-7b", messages=HI, max_tokens=2,
                                        extra_body={"priority": "bulk"})
        assert e.value.status_code == 504 and e.value.code == "timeout"
        rid = e.value.response.headers["x-request-id"]
        assert r.xlen("spool:jobs:bulk") == 1 and r.exists(f"spool:cancel:{{{rid}}}")

        # Redis at maxmemory (noeviction): the enqueue is refused, and the client gets a 503 it can retry.
        admin = redis_server.client()
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            with pytest.raises(openai.InternalServerError) as e:
                sdk.chat.completions.create(model="fake-7b", messages=HI, max_tokens=2, extra_body={"priority": "bulk"})
            assert e.value.status_code == 503 and e.value.code == "queue_full"
            assert "out of memory" in e.value.message and e.value.response.headers["retry-after"] == "5"
        finally:
            admin.config_set("maxmemory", 0)
    finally:
        gateway.stop()


def test_durable_gateway_answers_503_not_replicated_without_a_replica(redis_server, tmp_path):
    """`spool serve --durable`: a job no replica acknowledged (WAIT 1 timed out) is a 503 the client may resend."""
    gateway = GatewayProcess(redis_server.url, tmp_path, "--durable", "--no-worker-timeout", "0.5",
                             env={"SPOOL_DURABLE_TIMEOUT_MS": "200"}).start()
    try:
        r = Client(redis_server.url).redis
        fake_worker(r, gateway)
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.api_key, max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as e:
            sdk.chat.completions.create(model="fake-7b", messages=HI, max_tokens=2, extra_body={"request_id": "dur-1"})
        assert e.value.status_code == 503 and e.value.code == "not_replicated"
        assert e.value.response.headers["x-request-id"] == "dur-1"
        assert r.xlen("spool:jobs") == 1  # on the master: it will run; a resend with the same id is idempotent
    finally:
        gateway.stop()
