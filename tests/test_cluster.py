"""Redis Cluster: the worker and the clients on a real 3-master cluster, with 3 jobs shards (one per node)."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
import redis
from redis.crc import key_slot

from spool.engine import LLMEngine
from spool.producer import Client
from spool.producer.admin import deployment_status, list_dead, retry_dead
from spool.protocol import Result
from spool.protocol.connection import connect
from spool.protocol.keys import Keys
from spool.protocol.scripts import FINALIZE, flat_fields
from spool.testing import history
from spool.testing.chaos import WorkerProcess, audit, count_results, wait_for
from spool.testing.hostile_corpus import corpus
from spool.testing.redis_cluster import RedisCluster
from tests.worker_harness import running_worker

SHARDS = 3
KEYS = Keys(job_shards=SHARDS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as c:  # ~2 s to create: one per module
        yield c


@pytest.fixture
def url(cluster):
    cluster.flush()
    return cluster.url


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=8)


def test_cluster_is_detected_and_every_request_stays_in_one_slot(url, cluster):
    r = connect(url)
    assert isinstance(r, redis.RedisCluster)
    slots = {key_slot(k.encode()) for k in (KEYS.result("a"), KEYS.tokens("a"), KEYS.status("a"), KEYS.digest("a"),
                                             KEYS.quarantine("a"), KEYS.cancel("a"))}
    assert len(slots) == 1
    # Each shard's interactive and bulk streams share a slot; the shards sit on three different nodes.
    for shard in range(1, SHARDS):
        assert key_slot(KEYS.jobs("interactive", shard).encode()) == key_slot(KEYS.jobs("bulk", shard).encode())
    assert len({cluster.node_of(KEYS.jobs("interactive", s)).port for s in range(SHARDS)}) == SHARDS
    # The documented plain redis-cli round trip (docs/PROTOCOL.md) works on a cluster: -c follows redirects.
    assert Client(url, job_shards=SHARDS).status("nobody") == "unknown"


def test_worker_and_client_end_to_end_on_three_shards(engine, url):
    client = Client(url, job_shards=SHARDS)
    r = client.redis
    hist = history.History()
    jobs = [{"id": f"c{i}", "prompt": f"cluster job {i}", "max_tokens": 3 + i % 5, "ignore_eos": True,
             "stream": i % 2 == 0, "priority": "bulk" if i % 3 == 0 else "interactive"} for i in range(36)]
    ids = client.enqueue_many(jobs)
    for job in jobs:
        hist.acknowledged(job["id"], job["stream"])
    assert {KEYS.shard_of(i) for i in ids} == set(range(SHARDS))  # the jobs really are spread
    assert sum(r.xlen(s) for s in KEYS.all_jobs) == len(ids)
    long_job = client.enqueue("cancel me", max_tokens=400, ignore_eos=True, stream=True)
    r.xadd(KEYS.jobs("interactive", 2), {"not_job": b"x"})  # no id to answer to: a dead letter
    with running_worker(engine, url, job_shards=SHARDS) as w:
        tail: list = []
        tailer = threading.Thread(target=lambda: tail.extend(client.stream("c0", timeout=60)))
        tailer.start()
        wait_for(lambda: client.status(long_job) == "running", 60, what="long job running")
        client.cancel(long_job)
        for rid in ids:
            hist.read(client.result(rid, timeout=60))
        tailer.join(60)
        hist.tailed("c0", tail)
        cancelled = client.result(long_job, timeout=60)
        wait_for(lambda: r.xlen(KEYS.dead) == 1, 30, what="dead letter")
        wait_for(lambda: not len(w.outbox) and not w.inflight, 30, what="outbox drained")
        status = deployment_status(r, KEYS)  # what `spool status` prints
    assert cancelled.status == "cancelled"
    assert [e.type for e in tail][-1] == "done" and tail[0].type == "delta"
    problems = history.check(hist, r, KEYS)
    assert not problems, history.summary(problems)
    assert all(client.status(i) == "completed" for i in ids)
    [dead] = list_dead(r, KEYS)
    assert dead["stream"] == KEYS.jobs("interactive", 2) and dead["reason"].startswith("missing_job_field")
    assert status["dead_letters"] == 1 and set(status["streams"]) == set(KEYS.all_jobs)
    assert all(s["length"] == 0 and s["backlog"] == 0 for s in status["streams"].values())
    for stream in KEYS.all_jobs:
        assert r.xpending(stream, KEYS.group)["pending"] == 0


def test_result_written_but_ack_lost_reruns_as_a_harmless_duplicate(engine, url):
    """On a cluster the result and the XACK are separate steps: a worker that dies between them leaves its
    entry pending; the next worker sees the result and only acks it; the result and stream stay as they were."""
    client = Client(url, job_shards=SHARDS)
    r = client.redis
    rid = client.enqueue("half finished", max_tokens=4, stream=True)
    stream = KEYS.job_stream(rid)
    r.xgroup_create(stream, KEYS.group, id="0", mkstream=True)
    [(_, [(entry_id, _)])] = r.xreadgroup(KEYS.group, "dead-worker", {stream: ">"}, count=1)
    first = Result(id=rid, status="completed", worker="dead-worker")
    name, args, _ = FINALIZE.eval_cmd(
        [KEYS.result(rid), KEYS.tokens(rid), KEYS.status(rid), KEYS.digest(rid), KEYS.quarantine(rid)],
        [first.to_json(), 60, 100, 60, "run-1", -1, 1, *flat_fields({"type": "done", "data": "{}"})])
    assert getattr(r, name)(*args) == 1  # phase one landed; the process "died" before its XACK
    before = (r.get(KEYS.result(rid)), r.xrange(KEYS.tokens(rid)))
    with running_worker(engine, url, job_shards=SHARDS, claim_idle_ms=300) as w:
        wait_for(lambda: r.xpending(stream, KEYS.group)["pending"] == 0, 30, what="the orphan acked")
        assert w.finisher.finals_won == 0
    assert (r.get(KEYS.result(rid)), r.xrange(KEYS.tokens(rid))) == before
    assert client.result(rid).worker == "dead-worker"


def test_sigkill_a_worker_on_the_cluster_loses_nothing(tiny_llama, url, tmp_path):
    client = Client(url, job_shards=SHARDS)
    r = client.redis
    flags = ("--job-shards", str(SHARDS))
    w1 = WorkerProcess(tiny_llama, url, "w1", tmp_path, *flags).start()
    w2 = WorkerProcess(tiny_llama, url, "w2", tmp_path, *flags).start()
    try:
        ids = client.enqueue_many([{"id": f"k{i}", "prompt": f"crash {i}", "max_tokens": 20 + i % 10,
                                    "ignore_eos": True, "stream": i % 2 == 0} for i in range(60)])
        wait_for(lambda: _holds_jobs(r, "w1") and count_results(r, KEYS, ids) >= 5, 90, what="w1 working")
        w1.kill()
        wait_for(lambda: count_results(r, KEYS, ids) == len(ids), 90, interval=0.2, what="all results")
        a = audit(r, KEYS, ids)
        assert a.ok and a.statuses == {"completed": len(ids)}, (a.summary(), w2.log_tail())
        wait_for(lambda: all(r.xpending(s, KEYS.group)["pending"] == 0 for s in KEYS.all_jobs), 30,
                 what="every entry acked")
    finally:
        w1.kill()
        w2.stop()


def _holds_jobs(r, consumer: str) -> bool:
    try:
        return any(r.xpending_range(s, KEYS.group, "-", "+", 10, consumername=consumer) for s in KEYS.all_jobs)
    except redis.ResponseError:  # NOGROUP: the workers have not created the groups yet
        return False


def test_hostile_corpus_on_the_cluster(engine, url):
    client = Client(url, job_shards=SHARDS)
    r = client.redis
    cases = corpus()
    expected, dead = {}, 0
    for case in cases:
        entry = r.xadd(KEYS.jobs(), case.fields).decode()
        if case.dead:
            dead += 1
        else:
            expected[case.id or entry] = case
    good = client.enqueue_many([{"prompt": f"good {i}", "max_tokens": 3} for i in range(6)])
    with running_worker(engine, url, job_shards=SHARDS):
        wait_for(lambda: r.xlen(KEYS.dead) >= dead, 120, what="dead letters")
        results = {rid: client.result(rid, timeout=120) for rid in [*expected, *good]}
    for rid, case in expected.items():
        res = results[rid]
        assert (res.error.code if res.error else None) == case.code, (case.name, res.error)
    assert all(results[g].status == "completed" for g in good)
    assert r.xlen(KEYS.dead) == dead
    assert audit(r, KEYS, [*expected, *good]).ok
    # `spool dead retry` on a cluster: the requeue touches three slots, one after the other.
    letter = next(row for row in list_dead(r, KEYS) if row.get("job"))
    entry, stream = retry_dead(r, KEYS, letter["dead_id"])
    assert stream == KEYS.jobs() and r.xlen(KEYS.dead) == dead - 1 and r.xrange(stream, entry, entry)


def test_batch_async_client_and_idle_stream_on_the_cluster(engine, url, tmp_path, monkeypatch):
    import asyncio

    from spool.producer import AsyncClient, batch

    monkeypatch.setenv("SPOOL_JOB_SHARDS", str(SHARDS))  # the batch runner's client reads it
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "m", "prompt": f"batch line {i}", "max_tokens": 3}} for i in range(12)]
    inp.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    client = Client(url, job_shards=SHARDS)

    async def use_async_client() -> tuple[str, list[str]]:
        ac = AsyncClient(url, job_shards=SHARDS)
        rid = await ac.enqueue("async on a cluster", max_tokens=3, stream=True)
        kinds = [ev.type async for ev in ac.stream(rid, timeout=60)]
        return (await ac.result(rid, timeout=60)).status, kinds

    with running_worker(engine, url, job_shards=SHARDS):
        info = batch.run(inp, out, batch_id="on-cluster", redis_url=url)
        status, kinds = asyncio.run(use_async_client())
        done = client.enqueue("already done", max_tokens=2, stream=True)
        client.result(done, timeout=60)
    assert info.status == "completed" and info.to_dict()["request_counts"]["completed"] == len(lines)
    assert sorted(orjson.loads(x)["custom_id"] for x in out.read_bytes().splitlines()) == sorted(
        line["custom_id"] for line in lines)
    assert batch.status("on-cluster", redis_url=url).status == "completed"
    assert status == "completed" and kinds[-1] == "done" and "delta" in kinds
    # A tailer that resumes after the done entry finishes from the result (GET + XRANGE in one slot's MULTI).
    last = client.redis.xrevrange(KEYS.tokens(done), count=1)[0][0]
    assert [ev.type for ev in client.stream(done, timeout=10, last_id=last.decode())] == ["done"]
    # The operator's views read every shard and the batch index on the cluster.
    for verb in (["top", "--once"], ["status"]):
        out = subprocess.run([sys.executable, "-m", "spool", *verb, "--redis-url", url, "--job-shards", str(SHARDS)],
                             capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert KEYS.jobs("bulk", 2) in out.stdout, out.stdout


def test_gateway_on_the_cluster(engine, url, tmp_path):
    import openai

    from spool.testing.gateway import GatewayProcess

    key, hi = "sk-cluster-0123456789", [{"role": "user", "content": "Hello from a cluster"}]
    gateway = GatewayProcess(url, tmp_path, "--served-model-name", "tiny", api_key=key,
                             env={"SPOOL_JOB_SHARDS": str(SHARDS)}).start()
    try:
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=60)
        with running_worker(engine, url, job_shards=SHARDS):
            chat = sdk.chat.completions.create(model="tiny", messages=hi, max_tokens=5, temperature=0)
            pieces = [c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
                model="tiny", messages=hi, max_tokens=5, temperature=0, stream=True) if c.choices]
    finally:
        gateway.stop()
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 5
    assert "".join(pieces) == chat.choices[0].message.content  # greedy: the streamed text is the same
    rid = chat._request_id
    assert Client(url, job_shards=SHARDS).result(rid, timeout=5).text == chat.choices[0].message.content


def test_shards_on_a_single_redis_too(engine, redis_url):
    """One layout for both: the sharded streams work unchanged on one redis-server."""
    client = Client(redis_url, job_shards=SHARDS)
    ids = client.enqueue_many([{"prompt": f"single node {i}", "max_tokens": 2, "stream": i % 2 == 0,
                                "priority": "bulk" if i % 2 else "interactive"} for i in range(18)])
    assert {KEYS.shard_of(i) for i in ids} == set(range(SHARDS))
    with running_worker(engine, redis_url, job_shards=SHARDS):
        results = [client.result(i, timeout=60) for i in ids]
    assert all(r.status == "completed" for r in results)
    assert audit(client.redis, KEYS, ids).ok


def test_phased_writes_send_the_acks_only_after_everything_else_landed(monkeypatch):
    from spool.worker import cluster_io

    sent: list[list[str]] = []
    fail = {"first": True}

    def pipeline(client, commands):
        sent.append([args[0] for args, _ in commands])
        if fail["first"]:
            fail["first"] = False
            raise redis.ConnectionError("a node is down")
        return [1] * len(commands)

    monkeypatch.setattr(cluster_io, "_pipeline", pipeline)
    cmds = [(("XACK", "s", "g", "1-0"), None), (("EVALSHA", "sha", 0), None), (("XDEL", "s", "1-0"), None)]
    with pytest.raises(redis.ConnectionError):
        cluster_io.send_phased(None, cmds, [])
    assert sent == [["EVALSHA"]]  # the results did not land: no XACK was sent
    assert cluster_io.send_phased(None, cmds, []) == [1, 1, 1]
    assert sent[1:] == [["EVALSHA"], ["XACK", "XDEL"]]


def test_phased_writes_keep_everything_when_a_node_is_out_of_memory(monkeypatch):
    from spool.worker import cluster_io

    sent: list[list[str]] = []

    def pipeline(client, commands):
        sent.append([args[0] for args, _ in commands])
        return [redis.exceptions.OutOfMemoryError("OOM command not allowed")] * len(commands)

    monkeypatch.setattr(cluster_io, "_pipeline", pipeline)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        cluster_io.send_phased(None, [(("EVALSHA", "sha", 0), None), (("XACK", "s", "g", "1-0"), None)], [])
    assert sent == [["EVALSHA"]]  # the result was refused: its XACK must not follow


def test_script_calls_name_their_node_instead_of_asking_the_server(url, cluster):
    """redis-py 8's cluster pipeline asks the server (COMMAND GETKEYS) for the keys of every EVAL/EVALSHA, one
    extra round trip per streamed write; spool.protocol.connection.script_route names the node from the first key."""
    from spool.protocol.commands import execute
    from spool.protocol.scripts import Script
    from spool.worker.cluster_io import send_phased

    probe = Script("probe", 1, "return redis.call('SET', KEYS[1], ARGV[1])")
    keys = [KEYS.result(f"route-{i}") for i in range(12)]
    r = connect(url)
    r.script_load(probe.text)
    for node in cluster.nodes:
        node.client().config_resetstat()
    execute(r, [probe.eval_cmd([k], ["x"]) for k in keys[:6]])  # the producers' path: EVAL with the text
    send_phased(r, [(probe.args([k], ["x"]), None) for k in keys[6:]], [probe])  # the worker's outbox: EVALSHA
    stats = [node.client().info("commandstats") for node in cluster.nodes]
    getkeys = sum(int(st.get("cmdstat_command|getkeys", {}).get("calls", 0)) for st in stats)
    scripts = sum(int(st.get(f"cmdstat_{c}", {}).get("calls", 0)) for st in stats for c in ("eval", "evalsha"))
    assert scripts == 12 and getkeys == 0, (scripts, getkeys)
    assert all(r.get(k) == b"x" for k in keys)
