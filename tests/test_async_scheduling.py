"""Async scheduling (spool/engine/async_step.py): step N+1 is scheduled while step N runs; outputs equal synchronous
ones."""
from __future__ import annotations

import random

import pytest

from spool.engine import LLMEngine, SamplingParams
from tests.hf_reference import hf_greedy


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def drive(model, async_scheduling: bool, requests, on_delta=None, **engine_kw):
    """Run requests [(id, prompt ids, params, priority)] through launch/collect; per (id, index) what came out."""
    kw = {"block_size": 8, "max_num_seqs": 8, **engine_kw}
    eng = LLMEngine.from_kwargs(str(model), device="cpu", async_scheduling=async_scheduling, **kw)
    for rid, prompt, params, priority in requests:
        eng.add_request(rid, {"prompt_token_ids": prompt}, params, priority=priority)
    out: dict[tuple[str, int], dict] = {}
    for _ in range(2000):
        if not eng.has_unfinished_requests():
            break
        step = eng.launch()
        for d in eng.collect(step):
            rec = out.setdefault((d.request_id, d.index), {"tokens": [], "text": "", "lps": [], "finish": None})
            rec["tokens"] += d.new_token_ids
            rec["text"] += d.new_text
            rec["lps"] += d.new_logprobs or []
            if d.finished:
                rec["finish"] = (d.finish_reason, d.stop_reason)
            if on_delta is not None:
                on_delta(eng, d, rec)
        eng.block_manager.check_invariants()
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_used_blocks == 0 and not eng.requests
    return out, eng


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert (x["tokens"], x["text"], x["finish"]) == (y["tokens"], y["text"], y["finish"]), key
        assert len(x["lps"]) == len(y["lps"])
        for p, q in zip(x["lps"], y["lps"]):
            assert p.keys() == q.keys()
            assert all(p[t].logprob == pytest.approx(q[t].logprob, abs=1e-4) for t in p)


def _greedy_requests(n: int, seed: int, max_tokens=12, lengths=(5, 9, 17, 30, 41)) -> list:
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [(f"r{i}", _ids(lengths[i % len(lengths)], seed + i), p, 0) for i in range(n)]


@pytest.mark.parametrize("engine_kw", [
    {},
    {"max_num_batched_tokens": 24, "max_num_seqs": 4},  # chunked prefill mixed with decodes
    {"num_kv_blocks": 14},  # preemption and recompute
], ids=["plain", "chunked", "preempting"])
def test_async_greedy_equals_transformers(tiny_llama, engine_kw):
    reqs = _greedy_requests(6, 1)
    out, eng = drive(tiny_llama, True, reqs, **engine_kw)
    for rid, prompt, _, _ in reqs:
        assert out[(rid, 0)]["tokens"] == hf_greedy(tiny_llama, prompt, 12), rid
    if "num_kv_blocks" in engine_kw:
        assert eng.scheduler.num_preemptions > 0
    assert eng.stats.num_steps > 0


def test_async_steps_overlap_and_feed_tokens_on_the_device(tiny_llama):
    """Each decode step is launched before the previous one is applied, with its input token from the device."""
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, async_scheduling=True)
    eng.add_request("a", {"prompt_token_ids": _ids(9, 1)}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    fed = []
    while eng.has_unfinished_requests():
        step = eng.launch()
        fed.append(len(step.sched.device_input_rows))
        eng.collect(step)
    # prefill, then 5 decodes whose token is still on the device when they launch, then one empty launch.
    assert fed[:6] == [0, 1, 1, 1, 1, 1]
    assert eng.stats.num_steps == 6


def test_async_equals_sync_with_stops_n_logprobs_and_seeds(tiny_llama):
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    full, _ = drive(tiny_llama, False, [(f"f{i}", _ids(7 + i, 40 + i), base, 0) for i in range(4)])
    reqs = []
    for i in range(4):
        prompt, tokens, text = _ids(7 + i, 40 + i), full[(f"f{i}", 0)]["tokens"], full[(f"f{i}", 0)]["text"]
        reqs.append((f"stop-id{i}", prompt, base.model_copy(update={"stop_token_ids": [tokens[3 + i]]}), 0))
        if len(text) > 8:
            reqs.append((f"stop-str{i}", prompt, base.model_copy(update={"stop": [text[4:7]]}), 0))
        reqs.append((f"len{i}", prompt, base.model_copy(update={"max_tokens": 1 + i}), 0))
        reqs.append((f"lp{i}", prompt, base.model_copy(update={"logprobs": 2}), 0))
        reqs.append((f"eos{i}", prompt, SamplingParams(temperature=0, max_tokens=16), 0))
    reqs.append(("seeded", _ids(12, 7), SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=10), 0))
    sync, _ = drive(tiny_llama, False, reqs)
    asynced, eng = drive(tiny_llama, True, reqs)
    _same(asynced, sync)
    assert any(r["finish"][0] == "stop" for r in sync.values())
    assert eng.block_manager.stats.queries > 0


def test_async_equals_sync_with_fallback_rows(tiny_llama):
    """Penalties and min_tokens read the output history on the host: their steps sample only after the previous
    step is applied (the launch is split around it: spool/engine/async_step.py)."""
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    reqs = [(f"p{i}", _ids(8 + i, i), plain, 0) for i in range(3)]
    reqs.append(("rep", _ids(8, 50), plain.model_copy(update={"repetition_penalty": 1.5, "frequency_penalty": 0.5}), 0))
    reqs.append(("min", _ids(8, 51), SamplingParams(temperature=0, max_tokens=10, min_tokens=8), 0))
    sync, _ = drive(tiny_llama, False, reqs)
    asynced, _ = drive(tiny_llama, True, reqs)
    _same(asynced, sync)


def test_async_aborts_and_late_adds_equal_sync(tiny_llama):
    """Aborts after a request's 3rd token and requests added mid-run: the same outputs, nothing leaks."""
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reqs = [(f"a{i}", _ids(9 + i, i), p, 0) for i in range(4)]

    def on_delta(eng, d, rec):
        if d.request_id == "a1" and len(rec["tokens"]) == 3 and not d.finished:
            eng.abort("a1")
        if d.request_id == "a0" and len(rec["tokens"]) == 2 and "late" not in eng.requests:
            eng.add_request("late", {"prompt_token_ids": _ids(15, 7)}, p)

    sync, _ = drive(tiny_llama, False, reqs, on_delta, num_kv_blocks=30)
    asynced, _ = drive(tiny_llama, True, reqs, on_delta, num_kv_blocks=30)
    _same(asynced, sync)
    assert sync[("a1", 0)]["finish"][0] == "abort" and len(sync[("a1", 0)]["tokens"]) == 3
    assert len(sync[("late", 0)]["tokens"]) == 12


def test_async_preemption_under_priorities_equals_sync(tiny_llama):
    """Interactive work preempting bulk (tokens pending on the device when preempted) changes no output."""
    bulk = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reqs = [(f"bulk{i}", _ids(20 + i, i), bulk, 1) for i in range(5)]

    def on_delta(eng, d, rec):
        if d.request_id == "bulk0" and len(rec["tokens"]) in (3, 9):
            rid = f"inter{len(rec['tokens'])}"
            if rid not in eng.requests:
                eng.add_request(rid, {"prompt_token_ids": _ids(12, 99)}, SamplingParams(temperature=0, max_tokens=4),
                                priority=0)

    sync, s_eng = drive(tiny_llama, False, reqs, on_delta, num_kv_blocks=20, max_num_seqs=5)
    asynced, a_eng = drive(tiny_llama, True, reqs, on_delta, num_kv_blocks=20, max_num_seqs=5)
    assert a_eng.scheduler.num_preemptions > 0
    _same(asynced, sync)
    for rid, prompt, _, _ in reqs:
        assert asynced[(rid, 0)]["tokens"] == hf_greedy(tiny_llama, prompt, 20)


def test_speculative_step_after_a_stop_leaks_into_no_prefix_cache(tiny_llama):
    """A sequence that stops at step N gets one more launched step; what it wrote is never served as a prefix."""
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = _ids(13, 3)  # 13 + k tokens: the stop falls at block boundaries for some k below
    full, _ = drive(tiny_llama, False, [("f", prompt, base, 0)])
    tokens = full[("f", 0)]["tokens"]
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, async_scheduling=True)
    for k in (2, 3, 4, 11):  # stop after k output tokens (prompt + k = 15, 16, 17, 24 tokens)
        stop = tokens[k - 1]
        if stop in tokens[: k - 1]:
            continue
        eng.add_request(f"s{k}", {"prompt_token_ids": prompt}, base.model_copy(update={"stop_token_ids": [stop]}))
        got = []
        while eng.has_unfinished_requests():
            step = eng.launch()
            for d in eng.collect(step):
                got += d.new_token_ids
        assert got == tokens[:k]
        eng.block_manager.check_invariants()
        # A prompt continuing that output past the stop: any cached block must hold exactly its tokens' KV.
        probe = prompt + tokens + _ids(5, k)
        eng.add_request(f"probe{k}", {"prompt_token_ids": probe}, SamplingParams(temperature=0, max_tokens=6,
                                                                                   ignore_eos=True))
        got = []
        while eng.has_unfinished_requests():
            step = eng.launch()
            for d in eng.collect(step):
                got += d.new_token_ids
        assert got == hf_greedy(tiny_llama, probe, 6)
    assert eng.block_manager.stats.hits > 0 and eng.block_manager.num_used_blocks == 0


def test_random_load_with_swap_reserve_priorities_and_aborts_equals_sync(tiny_llama):
    """Async scheduling + swap + a tight cache + priorities + aborts and adds mid-run: the outputs of a roomy
    synchronous engine, block invariants after every step, nothing left in the KV cache or host swap space."""
    rng = random.Random(7)
    reqs, plan = [], {}
    for i in range(14):
        prompt = _ids(rng.randrange(3, 45), 100 + i)
        params = SamplingParams(temperature=0, max_tokens=rng.randrange(2, 18), ignore_eos=rng.random() < 0.7,
                                n=rng.choice([1, 1, 2]))
        reqs.append((f"q{i}", prompt, params, rng.choice([0, 1, 1])))
        if params.n == 1 and rng.random() < 0.3:  # (a sibling's progress at the abort would depend on timing)
            plan[f"q{i}"] = rng.randrange(1, 4)  # aborted after this many tokens

    def on_delta(eng, d, rec):
        if d.index == 0 and plan.get(d.request_id) == len(rec["tokens"]) and not d.finished:
            eng.abort(d.request_id)

    roomy, _ = drive(tiny_llama, False, reqs, on_delta, num_kv_blocks=300, max_num_seqs=6, priority_reserve=0.0)
    tight, eng = drive(tiny_llama, True, reqs, on_delta, num_kv_blocks=16, max_num_seqs=6,
                       swap_space_bytes=1 << 24, swap_min_tokens=12, max_num_batched_tokens=40)
    assert eng.scheduler.num_swapped_out > 0
    assert eng.scheduler.host_blocks_free == eng.scheduler.host_blocks and not eng.swap_space.host
    _same(tight, roomy)


def test_worker_with_async_scheduling_serves_jobs_like_sync(tiny_llama, redis_url):
    """The worker's launch / Redis I/O / collect tick on an async-scheduling engine, some jobs with a grammar:
    same results as sync."""
    from spool.producer import Client
    from spool.protocol.connection import connect
    from spool.worker.loop import Worker
    from spool.worker.settings import WorkerSettings

    client = Client(redis_url)
    jobs = [{"prompt_token_ids": _ids(6 + 3 * i, i), "max_tokens": 6 + i, "ignore_eos": i % 2 == 0,
             "temperature": 0, "stream": i % 3 == 0, "priority": ("interactive", "bulk")[i % 2]} for i in range(8)]
    for i in (1, 4, 6):  # structured outputs: their steps split around the previous step's apply
        jobs[i]["structured_outputs"] = {"regex": r"[a-z]{2,6}-\d{2,4}"}
    results = {}
    for mode in (False, True):
        ids = client.enqueue_many([dict(j, id=f"{mode}-{k}") for k, j in enumerate(jobs)])
        eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4,
                                    async_scheduling=mode)
        w = Worker(eng, connect(redis_url, fail_fast=True),
                   WorkerSettings(redis_url=redis_url, name=f"w-{mode}", block_ms=20))
        assert w.start()
        for _ in range(500):
            w.tick()
            if w.jobs_done == len(jobs) and not w.inflight:
                break
        w._leave()
        results[mode] = [(r.status, r.token_ids, r.finish_reason) for r in (client.result(i, timeout=5) for i in ids)]
        assert eng.block_manager.num_used_blocks == 0
    assert results[True] == results[False]
    assert all(status == "completed" for status, _, _ in results[True])
