"""Hostile input: every malformed entry ends as a failed result (or a dead letter), good jobs keep flowing."""
from __future__ import annotations

import pytest

from spool.engine import LLMEngine
from spool.producer import Client
from spool.protocol.keys import Keys
from spool.testing.chaos import audit, wait_for
from spool.testing.hostile_corpus import MODEL_CONTEXT, bad_cases, corpus
from tests.worker_harness import running_worker

KEYS = Keys()


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=8)
    assert eng.max_model_len == MODEL_CONTEXT  # the corpus's expectations assume this context
    return eng


def test_corpus_covers_the_contract():
    names = {c.name for c in corpus()}
    assert len(bad_cases()) >= 40 and len(names) == len(corpus())
    for must in ("invalid_json", "invalid_job", "too_large", "invalid_id", "missing_job_field",
                 "unsupported_version", "invalid_prompt"):
        assert any(c.code == must for c in corpus()), must


def test_hostile_corpus_fails_cleanly_while_good_jobs_complete(engine, redis_url):
    client = Client(redis_url)
    r = client.redis
    cases, expected_dead, expected_results, good = corpus(), {}, {}, []
    for i, case in enumerate(cases):
        entry = r.xadd(KEYS.jobs(), case.fields).decode()
        if case.dead:
            expected_dead[entry] = case
        else:
            expected_results[case.id or entry] = case
        good.append(client.enqueue(f"good job {i}", max_tokens=4 + i % 5, ignore_eos=True, stream=i % 2 == 0))
    with running_worker(engine, redis_url) as w:
        wait_for(lambda: r.xlen(KEYS.dead) >= len(expected_dead), 120, what="dead letters")
        results = {rid: client.result(rid, timeout=120) for rid in [*expected_results, *good]}
        assert not w.stopping
    for rid, case in expected_results.items():
        res = results[rid]
        if case.code is None:
            assert res.status == "completed", (case.name, res.error)
        else:
            assert res.status == "failed" and res.error.code == case.code, (case.name, res.error)
            assert res.error.message and len(res.error.message) < 2000, case.name
    dead = {f[b"entry_id"].decode(): f for _, f in r.xrange(KEYS.dead)}
    assert set(dead) == set(expected_dead)
    for entry, case in expected_dead.items():
        reason = dead[entry][b"reason"].decode()
        assert reason.startswith(case.code + ":"), (case.name, reason)
        assert dead[entry][b"id"] == b"" and dead[entry][b"stream"] == KEYS.jobs().encode()
    assert all(results[g].status == "completed" for g in good)
    a = audit(r, KEYS, [*expected_results, *good])
    assert a.ok, a.summary()
    assert r.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0
    assert engine.block_manager.num_used_blocks == 0
    # Nothing keyed by an unvalidated id: every key is one of ours, built from a validated id.
    for key in r.scan_iter(count=1000):
        kind, _, rid = key.decode().removeprefix("spool:").partition(":")
        assert kind in {"jobs", "result", "tokens", "status", "dead", "worker", "workers", "stats", "digest", "quarantine"}, key
        braced = rid[:1] + rid[-1:] == "{}"  # the id is the key's cluster hash tag
        assert not rid or kind == "jobs" or (braced and KEYS.result(rid[1:-1])), key


def test_limits_come_from_the_environment(engine, redis_url, monkeypatch):
    monkeypatch.setenv("SPOOL_MAX_N", "2")
    monkeypatch.setenv("SPOOL_MAX_TOKENS", "10")
    monkeypatch.setenv("SPOOL_MAX_STOP", "1")
    monkeypatch.setenv("SPOOL_MAX_JOB_BYTES", "300")
    monkeypatch.setenv("SPOOL_MAX_PROMPT_TOKENS", "3")
    r = Client(redis_url).redis
    raw = {
        "lim-n": b'{"id":"lim-n","prompt":"x","n":3,"max_tokens":1}',
        "lim-max": b'{"id":"lim-max","prompt":"x","max_tokens":11}',
        "lim-stop": b'{"id":"lim-stop","prompt":"x","stop":["a","b"],"max_tokens":1}',
        "lim-bytes": b'{"id":"lim-bytes","max_tokens":1,"prompt":"' + b"x" * 400 + b'"}',
        "lim-ids": b'{"id":"lim-ids","prompt_token_ids":[1,2,3,4],"max_tokens":1}',
        "lim-ok": b'{"id":"lim-ok","prompt":"x","n":2,"max_tokens":10,"stop":"a"}',
    }
    for doc in raw.values():
        r.xadd(KEYS.jobs(), {"job": doc})
    client = Client(redis_url)  # reads the same limits; used here only to wait
    with running_worker(engine, redis_url):
        got = {rid: client.result(rid, timeout=60) for rid in raw}
    codes = {rid: (res.error.code if res.error else res.status) for rid, res in got.items()}
    assert codes == {"lim-n": "invalid_job", "lim-max": "invalid_job", "lim-stop": "invalid_job",
                     "lim-bytes": "too_large", "lim-ids": "too_large", "lim-ok": "completed"}
    assert "at most 2" in got["lim-n"].error.message
