"""`spool serve`'s SSE path against a token stream written by hand (no worker, a fake heartbeat): keep-alive
comments while a job is silent, before its first event and between chunks; one chunk per (coalesced) entry; the
openai SDK reads through the comments."""
from __future__ import annotations

import threading
import time

import httpx2
import openai
import orjson
import pytest

from spool.protocol import Choice, Keys, Result, TokenEvent, Usage
from spool.testing.gateway import GatewayProcess
from spool.testing.redis_server import RedisServer

MODEL = "tiny"
KEYS = Keys()
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(redis client, gateway): a gateway with a 0.3 s keep-alive in front of a Redis where a worker seems alive."""
    tmp = tmp_path_factory.mktemp("gateway-streaming")
    server = RedisServer(tmp / "redis").start()
    r = server.client()
    r.hset(KEYS.worker("fake"), mapping={"model": orjson.dumps(MODEL), "last_seen": time.time()})
    r.sadd(KEYS.workers, "fake")
    gateway = GatewayProcess(server.url, tmp, "--served-model-name", MODEL, "--keepalive", "0.3", api_key=None,
                             env={"SPOOL_BLOCK_MS": "100"}).start()
    try:
        yield r, gateway
    finally:
        gateway.stop()
        server.stop()


def _write_later(r, rid: str, pieces: list[list[tuple[str, int]]], pause_s: float) -> threading.Thread:
    """After `pause_s`, and `pause_s` between entries, write what a worker would: one delta entry per group of
    (text, token id) pieces, then the result and done."""
    def run() -> None:
        seq = 0
        for group in pieces:
            time.sleep(pause_s)
            fields = TokenEvent.delta_fields(0, "".join(t for t, _ in group), [i for _, i in group])
            r.xadd(KEYS.tokens(rid), {"run": "r1", "seq": seq, **fields})
            seq += 1
        text = "".join(t for group in pieces for t, _ in group)
        ids = [i for group in pieces for _, i in group]
        res = Result(id=rid, status="completed", choices=[Choice(index=0, text=text, token_ids=ids,
                                                                 finish_reason="length")],
                     usage=Usage(prompt_tokens=1, completion_tokens=len(ids)))
        r.set(KEYS.result(rid), res.to_json())
        r.xadd(KEYS.tokens(rid), {"run": "r1", "seq": seq, **TokenEvent.done("completed", "length").to_fields()})

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_keepalive_pings_before_the_first_event_and_between_chunks(served):
    r, gateway = served
    rid = "ka-1"
    pieces = [[(" Once", 11)], [(" upon", 12), (" a", 13), (" time", 14)]]  # the second entry: three tokens
    writer = _write_later(r, rid, pieces, pause_s=1.2)
    lines = []
    body = {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True}
    with httpx2.stream("POST", gateway.base_url + "/chat/completions", json=body,
                       headers={"x-request-id": rid}, timeout=30) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line:
                lines.append(line)
    writer.join()
    assert lines[-1] == "data: [DONE]"
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert first_data > 0 and all(line == ": ping" for line in lines[:first_data])  # the response started early
    chunks = [orjson.loads(line[6:]) for line in lines if line.startswith("data: {")]
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [c for c in content if c] == [" Once", " upon a time"]  # one chunk per entry, however many tokens
    between = lines[lines.index(next(x for x in lines if '" Once"' in x)) + 1:]
    assert ": ping" in between[:between.index(next(x for x in between if '" upon a time"' in x))]


def test_the_openai_sdk_reads_through_keepalive_comments(served):
    r, gateway = served
    rid = "ka-2"
    writer = _write_later(r, rid, [[("Hel", 5)], [("lo", 6), ("!", 7)]], pause_s=0.8)
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key="none", max_retries=0, timeout=30)
    stream = sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, stream=True,
                                         extra_headers={"x-request-id": rid})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    writer.join()
    assert text == "Hello!"


def test_concurrent_streams_share_one_blocking_read(served):
    """24 streamed requests waiting at once: the gateway holds one connection blocked in XREAD for all of them
    (spool/producer/reads.py), and each stream still gets its own chunks."""
    r, gateway = served
    rids = [f"many-{i}" for i in range(24)]
    texts: dict[str, str] = {}

    def one(rid: str) -> None:
        body = {"model": MODEL, "messages": HI, "max_tokens": 2, "stream": True}
        parts = []
        with httpx2.stream("POST", gateway.base_url + "/chat/completions", json=body,
                           headers={"x-request-id": rid}, timeout=30) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    chunk = orjson.loads(line[6:])
                    parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
        texts[rid] = "".join(parts)

    clients = [threading.Thread(target=one, args=(rid,), daemon=True) for rid in rids]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(r.exists(KEYS.status(rid)) for rid in rids) < len(rids):
        time.sleep(0.05)
    time.sleep(0.5)  # every request now waits for its first event
    blocked = [c for c in r.client_list() if c["cmd"] == "xread" and "b" in c["flags"]]
    writers = [_write_later(r, rid, [[(f" {rid}", 1)], [("!", 2)]], pause_s=0.05) for rid in rids]
    for t in writers + clients:
        t.join(30)
    assert len(blocked) == 1, blocked
    assert texts == {rid: f" {rid}!" for rid in rids}
