"""Coalesced token streams (spool.worker.tokens): deltas written at most once per stream interval, the first at once,
the last ones with the final result; the stream's TTL set without an EXPIRE per write. Against a real
redis-server, with the real worker driving a stub engine (spool/testing/stub_engine.py) where timing matters."""
from __future__ import annotations

import pytest

from spool.producer import Client
from spool.protocol import Defaults, Keys, TokenEvent
from spool.protocol.connection import connect
from spool.protocol.job import parse_job
from spool.testing.stub_engine import StubEngine, token_id, token_text
from tests.worker_harness import running_worker
from spool.worker.inflight import InFlight
from spool.worker.loop import Worker
from spool.worker.outbox import Outbox
from spool.worker.settings import WorkerSettings
from spool.worker.tokens import TokenStreamWriter

KEYS = Keys()


def _inflight(rid: str, n: int = 1) -> InFlight:
    job = parse_job(f'{{"id": "{rid}", "prompt": "hi", "stream": true, "n": {n}}}')
    return InFlight(id=rid, job=job, stream=KEYS.jobs(), entry_id="1-0", priority="interactive", enqueued=None,
                    started=0.0)


def _deltas(r, rid: str) -> list[TokenEvent]:
    return [TokenEvent.from_fields(f, e) for e, f in r.xrange(KEYS.tokens(rid))
            if f[b"type"] == b"delta"]


def _calls(r, command: str) -> int:
    return r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_first_delta_at_once_then_one_write_per_interval_with_everything_since(redis_server):
    r = redis_server.client()
    outbox = Outbox(connect(redis_server.url))
    writer = TokenStreamWriter(outbox, KEYS, Defaults(), interval_ms=100)
    inf = _inflight("a", n=2)
    writer.delta(inf, 0, "Once", [1])
    writer.flush(now=10.0)  # the first output: written at once
    writer.delta(inf, 0, " upon", [2])
    writer.delta(inf, 1, "Twice", [7])
    writer.flush(now=10.05)  # within the interval: kept
    writer.delta(inf, 0, " a", [3])
    writer.flush(now=10.099)
    outbox.flush()
    assert [(e.index, e.text, e.token_ids) for e in _deltas(r, "a")] == [(0, "Once", [1])]
    writer.flush(now=10.101)  # the interval has passed: one write, one entry per choice
    outbox.flush()
    assert [(e.index, e.text, e.token_ids) for e in _deltas(r, "a")] == [
        (0, "Once", [1]), (0, " upon a", [2, 3]), (1, "Twice", [7])]
    assert writer.writes == 2
    writer.delta(inf, 0, " time", [4])
    writer.finish(inf)  # final: written at once, whatever the interval
    outbox.flush()
    assert "".join(e.text for e in _deltas(r, "a") if e.index == 0) == "Once upon a time"
    assert inf.seq == 3  # positions 0..3: a resent transaction appends nothing (spool.protocol.scripts.APPEND)


def test_interval_zero_writes_every_flush(redis_server):
    r = redis_server.client()
    outbox = Outbox(connect(redis_server.url))
    writer = TokenStreamWriter(outbox, KEYS, Defaults(), interval_ms=0)
    inf = _inflight("b")
    for i in range(5):
        writer.delta(inf, 0, f"t{i}", [i])
        writer.flush(now=1.0)  # the same instant: 0 means every step
    outbox.flush()
    assert [e.token_ids for e in _deltas(r, "b")] == [[i] for i in range(5)]


def test_ttl_set_on_the_first_write_and_refreshed_every_few_seconds_not_per_write(redis_server):
    r = redis_server.client()
    outbox = Outbox(connect(redis_server.url))
    defaults = Defaults(tokens_ttl_s=600)
    writer = TokenStreamWriter(outbox, KEYS, defaults, interval_ms=0)
    assert writer.ttl_refresh_s == 10.0
    inf = _inflight("c")
    r.config_resetstat()
    for i in range(50):  # 50 writes within 5 s: one EXPIRE (the run's first write)
        writer.delta(inf, 0, "x", [i])
        writer.flush(now=100.0 + i * 0.1)
        outbox.flush()
    assert _calls(r, "xadd") == 50 and _calls(r, "expire") == 1
    assert 590 < r.ttl(KEYS.tokens("c")) <= 600
    r.expire(KEYS.tokens("c"), 30)  # as if time had passed
    writer.delta(inf, 0, "y", [99])
    writer.flush(now=110.5)  # 10 s after the first write: this one refreshes the TTL
    outbox.flush()
    assert _calls(r, "expire") == 3 and r.ttl(KEYS.tokens("c")) > 590  # (our own EXPIRE above counted too)
    # The stream expired meanwhile (or was trimmed away): the write that creates it again sets its TTL.
    r.delete(KEYS.tokens("c"))
    writer.delta(inf, 0, "z", [100])
    writer.flush(now=111.0)
    outbox.flush()
    assert 590 < r.ttl(KEYS.tokens("c")) <= 600


def _worker(engine: StubEngine, url: str, interval_ms: int, **kw) -> Worker:
    return Worker(engine, connect(url, fail_fast=True),
                  WorkerSettings(redis_url=url, name="w", block_ms=50, stream_interval_ms=interval_ms, **kw))


def _expected(n_tokens: int) -> tuple[str, list[int]]:
    return "".join(token_text(i) for i in range(n_tokens)), [token_id(i) for i in range(n_tokens)]


def test_worker_writes_the_first_token_at_once_and_the_rest_with_the_final(redis_server):
    # An interval far longer than the job: its stream gets the first token, then everything else in one
    # entry written just before the result (same transaction), then done. No replay was needed.
    client, r = Client(redis_server.url), redis_server.client()
    ids = client.enqueue_many([{"id": f"s{i}", "prompt": "go", "max_tokens": 20, "stream": True} for i in range(4)])
    engine = StubEngine(max_num_seqs=8)
    with running_worker(engine, redis_server.url, stream_interval_ms=60_000):
        results = {rid: client.result(rid, timeout=60) for rid in ids}
    text, tids = _expected(20)
    for rid in ids:
        assert results[rid].text == text and results[rid].token_ids == tids
        kinds = [f[b"type"] for _, f in r.xrange(KEYS.tokens(rid))]
        assert kinds == [b"delta", b"delta", b"done"]
        first, rest = _deltas(r, rid)
        assert first.token_ids == tids[:1] and rest.token_ids == tids[1:]
        events = list(client.stream(rid, timeout=5))  # what a tailer reassembles
        assert "".join(e.text for e in events if e.type == "delta") == text


def test_worker_interval_zero_writes_every_step_and_coalescing_keeps_the_text(redis_server):
    client, r = Client(redis_server.url), redis_server.client()
    jobs = [{"id": f"z{i}", "prompt": "go", "max_tokens": 12, "stream": True, "n": 1 + i % 2} for i in range(6)]
    ids = client.enqueue_many(jobs)
    with running_worker(StubEngine(max_num_seqs=16), redis_server.url, stream_interval_ms=0):
        results = {rid: client.result(rid, timeout=60) for rid in ids}
    text, tids = _expected(12)
    for rid in ids:
        per_choice = {}
        for e in _deltas(r, rid):
            assert len(e.token_ids) == 1  # one entry per choice per step
            per_choice.setdefault(e.index, []).append(e)
        assert len(per_choice) == len(results[rid].choices)
        for c in results[rid].choices:
            assert "".join(e.text for e in per_choice[c.index]) == c.text == text
            assert [t for e in per_choice[c.index] for t in e.token_ids] == c.token_ids == tids


def test_worker_respects_the_interval(redis_server):
    # 10 ms steps, 80 ms interval: after the first token, entries at least ~80 ms apart, each with several
    # tokens; the whole text still equals the result.
    client, r = Client(redis_server.url), redis_server.client()
    rid = client.enqueue("go", max_tokens=60, stream=True)
    with running_worker(StubEngine(max_num_seqs=4, step_s=0.01), redis_server.url, stream_interval_ms=80):
        res = client.result(rid, timeout=60)
    entries = [(int(e.split(b"-")[0]), TokenEvent.from_fields(f)) for e, f in r.xrange(KEYS.tokens(rid))
               if f[b"type"] == b"delta"]
    assert "".join(ev.text for _, ev in entries) == res.text
    assert len(entries[0][1].token_ids) == 1
    middle = entries[1:-1]  # the last entry is the final flush: it may follow sooner
    assert middle and all(len(ev.token_ids) >= 2 for _, ev in middle)
    gaps = [b - a for (a, _), (b, _) in zip(entries[:-2], entries[1:-1])]
    # ms, Redis's clock: the writes are queued >= 80 ms apart (some slack for a descheduled test process)
    assert all(g >= 60 for g in gaps), gaps
    assert len(entries) <= 3 + (entries[-1][0] - entries[0][0]) // 80 < 60


def test_a_worker_that_dies_mid_stream_leaves_a_stream_that_expires(redis_server):
    r = redis_server.client()
    Client(redis_server.url).enqueue("go", id="dies", max_tokens=1000, stream=True)
    w = _worker(StubEngine(max_num_seqs=4), redis_server.url, 50)
    assert w.start()
    for _ in range(20):
        w.tick()
    # No final, no stop: the process is gone as far as Redis can tell.
    assert _deltas(r, "dies")
    assert 0 < r.ttl(KEYS.tokens("dies")) <= Defaults().tokens_ttl_s
    assert r.ttl(KEYS.tokens("dies")) != -1


def test_expire_is_not_sent_per_write(redis_server):
    # 8 streamed jobs x 40 tokens, written every step: per job one EXPIRE for its first write and two in the
    # final write (the done stream's TTL, the id digest's), none per delta.
    client, r = Client(redis_server.url), redis_server.client()
    ids = client.enqueue_many([{"id": f"e{i}", "prompt": "go", "max_tokens": 40, "stream": True} for i in range(8)])
    r.config_resetstat()
    with running_worker(StubEngine(max_num_seqs=8), redis_server.url, stream_interval_ms=0, heartbeat_s=3600):
        for rid in ids:
            client.result(rid, timeout=60)
    stats = r.info("commandstats")
    assert stats["cmdstat_xadd"]["calls"] >= 8 * 41
    assert stats["cmdstat_expire"]["calls"] <= 8 * 3 + 1  # (+1: the worker's heartbeat)


@pytest.mark.parametrize("interval_ms", [0, 50])
def test_restart_and_replays_still_equal_the_result_with_coalescing(redis_server, interval_ms):
    # A job reclaimed from a dead worker: the new run takes the stream over with a restart, and the deltas
    # after it equal the result (spool.testing.history checks every invariant).
    from spool.testing.history import History, check

    client, r = Client(redis_server.url), redis_server.client()
    history = History()
    rid = client.enqueue("go", id="re", max_tokens=30, stream=True)
    history.acknowledged(rid, streamed=True)
    first = _worker(StubEngine(max_num_seqs=4), redis_server.url, interval_ms, claim_idle_ms=200)
    assert first.start()
    for _ in range(10):
        first.tick()
    first.outbox.flush()  # dies here: its entry stays pending with a half-written stream
    with running_worker(StubEngine(max_num_seqs=4), redis_server.url, stream_interval_ms=interval_ms,
                        claim_idle_ms=200, name="w2"):
        history.read(client.result(rid, timeout=60))
    events = list(client.stream(rid, timeout=5))
    history.tailed(rid, events)
    assert any(e.type == "restart" for e in events)
    assert check(history, r, KEYS) == []


def test_token_event_fields_round_trip_and_strict_decoding():
    fields = TokenEvent.delta_fields(1, " upon a", [2, 3], finish_reason="length")
    assert fields == TokenEvent.delta(1, " upon a", [2, 3], finish_reason="length").to_fields()  # same bytes
    ev = TokenEvent.from_fields({k.encode(): v for k, v in fields.items()}, b"5-0")
    assert (ev.index, ev.text, ev.token_ids, ev.finish_reason, ev.entry_id) == (1, " upon a", [2, 3], "length", "5-0")
    # Only the keys of the entry's own type count; a restart without a reason gets "".
    done = TokenEvent.from_fields({"type": "done", "data": '{"status": "completed", "text": "stray"}'})
    assert done.status == "completed" and done.text == ""
    assert TokenEvent.from_fields({"type": "restart", "data": "{}"}).reason == ""
    for bad in ('{"index": "0", "text": "a"}', '{"text": 5}', '{"token_ids": [1.5]}', '[1]',
                '{"finish_reason": "bogus"}'):
        with pytest.raises(ValueError):
            TokenEvent.from_fields({"type": "delta", "data": bad})
    with pytest.raises(ValueError):
        TokenEvent.from_fields({"type": "done", "data": "{}"})  # a done needs its status
