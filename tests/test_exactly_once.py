"""Exactly once, end to end, under the faults of docs/PROTOCOL.md's guarantees (real redis-server, real
`spool worker` processes): lost replies, resent enqueues, reused ids, restart storms, and the Redis memory a
finished job leaves behind. Each run is checked by spool.testing.history."""
from __future__ import annotations

import random
import signal
import threading
import time

import orjson
import pytest
import redis

from spool.producer import Client, JobError
from spool.protocol import Keys
from spool.protocol.commands import execute
from spool.testing.chaos import WorkerProcess, count_results, wait_for
from spool.testing.history import History, check, summary

KEYS = Keys()


def _tail_all(client: Client, history: History, ids: list[str], timeout: float) -> list[threading.Thread]:
    """One tailer thread per id, reading the stream from its start until done, recorded in `history`."""
    def tail(rid: str) -> None:
        events = []
        try:
            for event in client.stream(rid, timeout=timeout):
                events.append(event)
        except (TimeoutError, redis.RedisError):
            return
        history.tailed(rid, events)

    threads = [threading.Thread(target=tail, args=(rid,), daemon=True) for rid in ids]
    for t in threads:
        t.start()
    return threads


def test_lost_replies_never_double_a_token_stream(tiny_llama, redis_server, tmp_path):
    """(a) CLIENT KILL every 20 ms while the worker generates: transactions whose reply was lost are sent again;
    every token stream still equals its result and nothing follows done. A fast host finishes a round of 16 jobs
    in a few kills, so rounds go on (up to 8) until the connections were killed more than 20 times mid-work."""
    client, history = Client(redis_server.url), History()
    w = WorkerProcess(tiny_llama, redis_server.url, "w", tmp_path, max_num_seqs=16).start()
    killer = redis.Redis.from_url(redis_server.url)
    killing, stop = threading.Event(), threading.Event()
    kills = []

    def kill_loop() -> None:
        while not stop.is_set():
            if killing.is_set():
                try:
                    kills.append(killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
                except redis.RedisError:
                    pass
            time.sleep(0.02)

    threading.Thread(target=kill_loop, daemon=True).start()
    ids: list[str] = []
    try:
        for round_ in range(8):
            batch = [client.enqueue(f"stream me {round_}.{i}", id=f"lost{round_}.{i}", max_tokens=150,
                                    ignore_eos=True, temperature=0.8, seed=i, stream=True) for i in range(16)]
            for rid in batch:
                history.acknowledged(rid, streamed=True)
            ids += batch
            wait_for(lambda: client.status(batch[0]) in ("running", "completed"), 60, what="worker started")
            killing.set()  # kills only while the worker generates, not during the enqueues
            wait_for(lambda: count_results(client.redis, KEYS, batch) == len(batch), 120, interval=0.2,
                     what="results")
            killing.clear()
            if sum(kills) > 20:
                break
        assert sum(kills) > 20, "the worker's connection was hardly ever killed: the test proved nothing"
        problems = check(history, client.redis, KEYS)
        assert not problems, summary(problems) + "\n" + w.log_tail()
        assert all(len(client.result(rid).token_ids) == 150 for rid in ids)
    finally:
        stop.set()
        w.kill()


def test_resent_enqueue_adds_nothing_and_another_document_is_refused(redis_url):
    """(b) The same enqueue sent twice (what a client retry does after a lost reply) adds one entry; the
    same id with another document fails duplicate_id and changes nothing."""
    client = Client(redis_url)
    from spool.producer import ops

    steps = ops.enqueue_steps(client.ctx, "hello", id="dupenq-1", max_tokens=200, stream=True)
    claim = next(steps)  # the first of enqueue's three steps (spool.protocol.commands.enqueue_flow)
    first = execute(client.redis, claim.cmds, claim.transaction)
    # A resend before the XADD (the first attempt died after its claim): the claim says "XADD it" again.
    second = execute(client.redis, claim.cmds, claim.transaction)
    assert (first, second) == ([1], [1]) and client.status("dupenq-1") == "queued"  # enqueuing reads as queued
    assert client.redis.xlen(KEYS.jobs()) == 0
    assert client.enqueue("hello", id="dupenq-1", max_tokens=200, stream=True) == "dupenq-1"  # the retry
    assert client.enqueue("hello", id="dupenq-1", max_tokens=200, stream=True) == "dupenq-1"  # idempotent
    assert execute(client.redis, claim.cmds, claim.transaction) == [0]  # after the XADD: nothing to add
    info = client.redis.xinfo_stream(KEYS.jobs())
    assert info["length"] == 1 and info["entries-added"] == 1
    client.redis.set(KEYS.status("dupenq-1"), "running")  # a worker took it meanwhile
    with pytest.raises(JobError) as err:
        client.enqueue("another prompt", id="dupenq-1", max_tokens=3)
    assert err.value.code == "duplicate_id" and "dupenq-1" in err.value.message
    assert client.redis.xlen(KEYS.jobs()) == 1 and client.status("dupenq-1") == "running"  # not back to queued
    with pytest.raises(JobError) as err:
        client.enqueue_many([{"prompt": "a", "id": "m1"}, {"prompt": "b", "id": "dupenq-1"}, {"prompt": "c", "id": "m3"}])
    assert err.value.code == "duplicate_id" and "job #1" in err.value.message
    assert err.value.enqueued == ["m1", "m3"]


def test_reused_id_never_mixes_two_jobs(tiny_llama, redis_server, tmp_path):
    """(c) An id reused while its first job runs: the client refuses the second document, a raw XADD of it
    becomes a duplicate_id dead letter; the first job's result and stream are its own."""
    client, history = Client(redis_server.url), History()
    workers = [WorkerProcess(tiny_llama, redis_server.url, f"w{i}", tmp_path).start() for i in range(2)]
    try:
        rid = client.enqueue("first prompt", id="X", max_tokens=300, ignore_eos=True, stream=True, temperature=0)
        history.acknowledged(rid, streamed=True)
        tailers = _tail_all(client, history, [rid], timeout=120)
        wait_for(lambda: client.status(rid) == "running", 60, what="first job running")
        with pytest.raises(JobError, match="duplicate_id"):
            client.enqueue("second", id="X", max_tokens=3, stream=True)
        raw = orjson.dumps({"id": "X", "prompt": "second", "max_tokens": 3, "stream": True})
        client.redis.xadd(KEYS.jobs(), {"job": raw})  # a raw producer reusing the id
        assert client.status(rid) == "running"
        result = client.result(rid, timeout=120)
        for t in tailers:
            t.join(30)
        assert result.status == "completed" and len(result.token_ids) == 300
        dead = wait_for(lambda: [f for _, f in client.redis.xrange(KEYS.dead)], 30, what="dead letter")
        assert len(dead) == 1 and dead[0][b"reason"].startswith(b"duplicate_id") and dead[0][b"job"] == raw
        problems = check(history, client.redis, KEYS)
        assert not problems, summary(problems)
    finally:
        for w in workers:
            w.kill()


def test_restart_storm_condemns_no_healthy_job(tiny_llama, redis_server, tmp_path):
    """(d) One of two workers SIGKILLed and restarted over and over: jobs pile up deliveries, run in
    quarantine, and every one of them still completes (none is dead-lettered as poison)."""
    client, history = Client(redis_server.url), History()
    extra = ("--max-deliveries", "1")  # suspicion after a single death: the quarantine path runs a lot
    steady = WorkerProcess(tiny_llama, redis_server.url, "steady", tmp_path, *extra, claim_idle_ms=600).start()
    flaky = WorkerProcess(tiny_llama, redis_server.url, "flaky", tmp_path, *extra, claim_idle_ms=600,
                          max_num_seqs=8).start()
    rng = random.Random(5)
    try:
        ids = client.enqueue_many([{"id": f"s{i}", "prompt": f"storm {i}", "max_tokens": 40 + i % 30,
                                    "ignore_eos": True, "stream": i % 3 == 0} for i in range(80)])
        for i, rid in enumerate(ids):
            history.acknowledged(rid, streamed=i % 3 == 0)
        kills, end = 0, time.monotonic() + 90  # each restart reloads the model: slow on a loaded 2-core machine
        while kills < 8 and time.monotonic() < end and count_results(client.redis, KEYS, ids) < len(ids):
            # Kill it while it holds jobs mid-generation (not while it loads the model), as a spot
            # preemption or a crash-looping rollout would.
            def holding():
                try:
                    return client.redis.xpending_range(KEYS.jobs(), KEYS.group, "-", "+", 1, consumername="flaky")
                except redis.ResponseError:  # NOGROUP: no worker has created the group yet
                    return None

            try:
                wait_for(holding, 15, interval=0.05, what="flaky holding jobs")
            except TimeoutError:
                break
            time.sleep(rng.uniform(0.1, 0.6))
            flaky.kill()
            kills += 1
            flaky.start()
        wait_for(lambda: count_results(client.redis, KEYS, ids) == len(ids), 120, interval=0.2, what="results")
        problems = check(history, client.redis, KEYS)
        assert not problems, summary(problems) + "\n" + steady.log_tail()
        assert kills >= 4  # a storm, not one crash: with --max-deliveries 1 every death sends jobs to quarantine
        assert {client.result(rid).status for rid in ids} == {"completed"}
    finally:
        flaky.kill()
        steady.kill()


def test_a_job_that_kills_workers_is_condemned_after_dying_alone(tiny_llama, redis_server, tmp_path):
    """The other side of (d): a job that really kills every worker that computes it is dead-lettered as
    poison_job once workers died while it ran alone; the healthy jobs beside it all complete."""
    client = Client(redis_server.url)
    extra = ("--max-deliveries", "2", "--max-quarantine-deaths", "2")
    workers = [WorkerProcess(tiny_llama, redis_server.url, f"c{i}", tmp_path, *extra, claim_idle_ms=500,
                             module="spool.testing.crash_worker") for i in range(2)]
    for w in workers:
        w.start()
    try:
        ids = client.enqueue_many([{"id": f"ok{i}", "prompt": f"healthy {i}", "max_tokens": 30, "ignore_eos": True}
                                   for i in range(12)])
        pill = client.enqueue("this is a POISON-PILL prompt", id="pill", max_tokens=30)
        end = time.monotonic() + 120
        while time.monotonic() < end and count_results(client.redis, KEYS, [*ids, pill]) < len(ids) + 1:
            for w in workers:
                if not w.alive:  # a supervisor restarts what died
                    w.start()
            time.sleep(0.2)
        result = client.result(pill, timeout=1)
        assert result.status == "failed" and result.error.code == "poison_job", result
        assert "while this job ran alone" in result.error.message
        assert {client.result(rid).status for rid in ids} == {"completed"}
        dead = [f for _, f in client.redis.xrange(KEYS.dead)]
        assert [f[b"id"] for f in dead] == [b"pill"]
    finally:
        for w in workers:
            w.kill()


def test_finished_jobs_leave_only_their_result(tiny_llama, redis_server, tmp_path):
    """(e) A finished job that nobody streamed keeps its result (and the id's digest) and nothing else once
    its done marker expires; a streamed job's stream expires soon after done."""
    client = Client(redis_server.url)
    env = {"SPOOL_DONE_MARKER_TTL_S": "1", "SPOOL_STREAM_DONE_TTL_S": "30"}
    w = WorkerProcess(tiny_llama, redis_server.url, "thin", tmp_path, env=env).start()
    try:
        ids = client.enqueue_many([{"id": f"lean{i}", "prompt": f"small job {i}", "max_tokens": 8} for i in range(20)])
        streamed = client.enqueue("streamed one", id="lean-s", max_tokens=8, stream=True)
        for rid in [*ids, streamed]:
            assert client.result(rid, timeout=60).status == "completed"
        assert 0 < client.redis.ttl(KEYS.tokens(streamed)) <= 30
        time.sleep(2.5)
        r = client.redis
        left = sorted(k.decode() for k in r.scan_iter("spool:*:{lean*"))
        assert left == sorted([*(KEYS.result(i) for i in ids), *(KEYS.digest(i) for i in ids),
                               KEYS.result(streamed), KEYS.digest(streamed), KEYS.tokens(streamed)])
        per_job = [r.memory_usage(KEYS.result(i)) + r.memory_usage(KEYS.digest(i)) for i in ids]
        assert max(per_job) <= 1100, per_job
    finally:
        w.stop()


def test_operator_stop_is_no_evidence_against_a_job(tiny_llama, redis_server, tmp_path):
    """Warm and cold stops hand unfinished jobs back at once with their delivery count unchanged."""
    client = Client(redis_server.url)
    w = WorkerProcess(tiny_llama, redis_server.url, "op", tmp_path, "--grace-period-s", "0", max_num_seqs=8)
    ids = client.enqueue_many([{"id": f"op{i}", "prompt": f"long {i}", "max_tokens": 480, "ignore_eos": True}
                               for i in range(8)])
    for n in range(4):  # four rollouts in a row
        w.start()
        wait_for(lambda: w.log_path.read_text().count("serving") == n + 1, 60, what="worker serving")
        wait_for(lambda: all(client.status(i) == "running" for i in ids), 60, what="running")
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(30) == 0, w.log_tail()
    rows = client.redis.xpending_range(KEYS.jobs(), KEYS.group, "-", "+", 100)
    assert len(rows) == 8 and max(row["times_delivered"] for row in rows) <= 1, rows
    assert max(row["time_since_delivered"] for row in rows) >= 1000  # released: any worker may take them now


def test_enqueue_through_a_frozen_redis_is_applied_once(tiny_llama, redis_server, tmp_path):
    """(b) redis-server SIGSTOPped past the client's socket timeout during an enqueue: the command reaches
    Redis, the client times out and sends it again; one job, one run, one stream."""
    from spool.protocol.connection import connect

    client, history = Client(redis_server.url, connection=connect(redis_server.url, socket_timeout=1.0)), History()
    done = {}

    def enqueue() -> None:
        done["id"] = client.enqueue("frozen", id="dupenq-1", max_tokens=100, ignore_eos=True, stream=True)

    client.redis.ping()  # connected before the freeze: the first send reaches Redis's socket buffer
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        t = threading.Thread(target=enqueue, daemon=True)
        t.start()
        time.sleep(2.5)  # past the 1 s socket timeout: the client has given up on the first send and retries
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    t.join(60)
    assert done.get("id") == "dupenq-1"
    history.acknowledged("dupenq-1", streamed=True)
    assert client.redis.xinfo_stream(KEYS.jobs())["entries-added"] == 1
    w = WorkerProcess(tiny_llama, redis_server.url, "w", tmp_path).start()
    try:
        assert client.result("dupenq-1", timeout=60).status == "completed"
        problems = check(history, client.redis, KEYS)
        assert not problems, summary(problems)
    finally:
        w.kill()


def test_redis_out_of_memory_mid_run_loses_and_doubles_nothing(tiny_llama, redis_server, tmp_path):
    """Redis refuses every write for a while (maxmemory reached, noeviction): the worker keeps its writes,
    sends them once memory frees, and every stream still equals its result."""
    client, history = Client(redis_server.url), History()
    admin = redis_server.client()
    w = WorkerProcess(tiny_llama, redis_server.url, "w", tmp_path, max_num_seqs=8).start()
    try:
        ids = client.enqueue_many([{"id": f"oom{i}", "prompt": f"memory {i}", "max_tokens": 200,
                                    "ignore_eos": True, "stream": True} for i in range(8)])
        for rid in ids:
            history.acknowledged(rid, streamed=True)
        wait_for(lambda: all(client.status(i) == "running" for i in ids), 60, what="running")
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # every write is refused from now on
        time.sleep(2.0)
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            client.redis.set("spool:probe", "x")
        admin.config_set("maxmemory", 0)
        wait_for(lambda: count_results(client.redis, KEYS, ids) == len(ids), 60, interval=0.2, what="results")
        problems = check(history, client.redis, KEYS)
        assert not problems, summary(problems) + "\n" + w.log_tail()
        assert "refused the transaction" in w.log_path.read_text()  # the outage really hit the worker
    finally:
        w.kill()
