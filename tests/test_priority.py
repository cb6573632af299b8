"""Interactive before bulk: engine preemption, worker admission order, and TTFT while a batch saturates a worker."""
from __future__ import annotations

import statistics
import threading
import time

import orjson

from spool.engine import LLMEngine, SamplingParams
from spool.producer import Client, batch
from tests.worker_harness import running_worker

INTERACTIVE, BULK = 0, 1  # engine priorities (protocol.PRIORITY_RANK): lower runs first


def small_engine(model, **kw):
    return LLMEngine.from_kwargs(str(model), device="cpu", block_size=8, **{"max_num_seqs": 4, **kw})


def test_engine_preempts_bulk_when_interactive_cannot_start(tiny_llama):
    eng = small_engine(tiny_llama)
    long = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)
    for i in range(4):
        eng.add_request(f"bulk-{i}", f"bulk prompt {i}", long, priority=BULK)
    for _ in range(3):
        eng.step()
    assert len(eng.scheduler.running) == 4  # max_num_seqs is full of bulk
    eng.add_request("inter", "an interactive prompt", SamplingParams(max_tokens=3, temperature=0), priority=INTERACTIVE)
    got = [d for d in eng.step() if d.request_id == "inter" and d.new_token_ids]
    assert got, "the interactive request did not get its first token in the next step"
    assert eng.scheduler.num_preemptions >= 1
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.block_manager.num_used_blocks == 0


def test_worker_serves_queued_interactive_before_queued_bulk(tiny_llama, redis_url):
    client = Client(redis_url)
    bulk = client.enqueue_many([{"prompt": f"bulk {i}", "max_tokens": 40, "ignore_eos": True, "priority": "bulk"}
                                for i in range(24)])
    inter = client.enqueue("interactive", max_tokens=40, ignore_eos=True)  # enqueued last
    with running_worker(small_engine(tiny_llama), redis_url):
        res = client.result(inter, timeout=120)
        bulk_done = sorted(client.result(b, timeout=120).timings.finished for b in bulk)
    assert res.status == "completed"
    assert res.timings.finished <= bulk_done[4], "the interactive job waited behind the bulk backlog"


def test_bulk_backlog_stays_in_redis_while_bulk_saturates_the_worker(tiny_llama, redis_url):
    client = Client(redis_url)
    client.enqueue_many([{"prompt": f"bulk {i}", "max_tokens": 100, "ignore_eos": True, "priority": "bulk"}
                         for i in range(60)])
    eng = small_engine(tiny_llama)
    with running_worker(eng, redis_url) as w:
        most, end = 0, time.monotonic() + 1.0
        while time.monotonic() < end:
            most = max(most, len(w.inflight))
            time.sleep(0.01)
        w.request_stop()
    assert most <= 4, f"the worker took {most} bulk jobs out of Redis with max_num_seqs=4"


# An interactive job must not wait in Redis for a bulk job to finish: the worker admits it even when
# max_num_seqs is full of bulk (admission_capacity(0) counts bulk slots as free) and the scheduler preempts.
def test_interactive_ttft_stays_bounded_while_a_batch_saturates_the_worker(tiny_llama, redis_url, tmp_path):
    n_bulk, bulk_tokens = 24, 300
    inp = tmp_path / "bulk.jsonl"
    inp.write_bytes(b"".join(orjson.dumps({
        "custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": f"bulk line {i}", "max_tokens": bulk_tokens, "ignore_eos": True}})
        + b"\n" for i in range(n_bulk)))
    client = Client(redis_url)
    box = {}
    with running_worker(small_engine(tiny_llama), redis_url) as w:
        runner = threading.Thread(target=lambda: box.setdefault("info", batch.run(
            inp, tmp_path / "out.jsonl", batch_id="saturate", redis_url=redis_url, max_in_flight=16)))
        runner.start()
        deadline = time.monotonic() + 60
        while sum(f.priority == "bulk" for f in list(w.inflight.values())) < 4:
            assert time.monotonic() < deadline, "the batch never saturated the worker"
            time.sleep(0.01)
        ttft = []
        for i in range(5):
            time.sleep(0.15)
            rid = client.enqueue(f"interactive {i}", max_tokens=4, ignore_eos=True)
            res = client.result(rid, timeout=120)
            assert res.status == "completed"
            ttft.append(res.timings.first_token - res.timings.enqueued)
            assert client.redis.xlen("spool:jobs:bulk") > 0 or i > 0  # bulk work was still waiting
        runner.join(180)
    info = box["info"]
    assert info.status == "completed" and info.to_dict()["request_counts"]["completed"] == n_bulk
    bulk = [r["response"]["body"]["usage"]["completion_tokens"] for r in batch.collect(tmp_path / "out.jsonl")]
    assert bulk == [bulk_tokens] * n_bulk  # preempted bulk jobs still finish, complete
    durations = []
    for rec in batch.collect(tmp_path / "out.jsonl"):
        t = client.result(rec["response"]["request_id"]).timings
        durations.append(t.finished - t.started)
    # Bounded by a few engine steps, far below the ~300 steps one bulk job takes.
    assert max(ttft) < 0.2 * statistics.median(durations), (ttft, statistics.median(durations))


def test_interactive_prompt_is_not_starved_by_running_bulk_prompt_chunks(tiny_llama):
    """A free slot but no token budget: running bulk prompts in chunked prefill must leave room for it."""
    eng = small_engine(tiny_llama, max_num_batched_tokens=32, max_num_seqs=8)
    long = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    for i in range(4):
        eng.add_request(f"bulk-{i}", list(range(100 + i, 300 + i)), long, priority=BULK)  # 200-token prompts
    eng.step()
    assert len(eng.scheduler.running) >= 1 and eng.scheduler.waiting  # bulk prompts are mid-prefill
    prompt = list(range(400, 420))
    eng.add_request("inter", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), priority=INTERACTIVE)
    step = eng.launch()
    assert [c.seq_id for c in step.sched.chunks] == ["inter#0"]  # bulk prompt chunks sit this step out
    got = [d for d in eng.collect(step) if d.request_id == "inter"]
    assert got and got[0].new_token_ids, "the interactive prompt waited behind running bulk prompt chunks"
    assert eng.scheduler.num_preemptions == 0  # it had a free slot: room came from the budget, not preemption
    outputs = {}
    while eng.has_unfinished_requests():
        for d in eng.step():
            outputs.setdefault(d.request_id, []).extend(d.new_token_ids)
    assert eng.block_manager.num_used_blocks == 0
    alone = small_engine(tiny_llama)
    alone.add_request("inter", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    ref = []
    while alone.has_unfinished_requests():
        for d in alone.step():
            ref.extend(d.new_token_ids)
    assert got[0].new_token_ids + outputs["inter"] == ref


def test_interactive_job_starts_in_the_next_launched_step(tiny_llama, redis_url):
    """Interactive jobs are read right before each launch, so one tick computes their first token."""
    from spool.protocol.connection import connect
    from spool.worker.loop import Worker
    from spool.worker.settings import WorkerSettings

    client = Client(redis_url)
    client.enqueue_many([{"prompt": f"bulk {i}", "max_tokens": 200, "ignore_eos": True, "priority": "bulk"}
                         for i in range(3)])
    eng = small_engine(tiny_llama)
    w = Worker(eng, connect(redis_url, fail_fast=True), WorkerSettings(redis_url=redis_url, name="pre", block_ms=20))
    assert w.start()
    for _ in range(3):
        w.tick()
    assert eng.has_unfinished_requests()
    rid = client.enqueue("an interactive prompt", max_tokens=5, ignore_eos=True)
    w.tick()
    out = eng.get_request_output(rid)
    assert out is not None and out.outputs[0].token_ids, "the interactive job waited a step in Redis"
    while w.inflight or eng.has_unfinished_requests():
        w.tick()
    assert client.result(rid, timeout=5).status == "completed"
