"""The Redis path's overhead and interactive TTFT (issue 17 items 5 and 6).

The scheduler's bulk prompt cap while interactive requests keep arriving; the worker's start on a backlog,
its interactive first outputs written before the next launch, its garbage-collector pacing; and the real
engine and worker on the simulated device (spool/testing/timed_runner.py): bulk through Redis takes the
steps the offline run takes.
"""
from __future__ import annotations

import gc
import time
import weakref

import pytest

from bench.shapes import shape_dir
from spool.engine import LLM, SamplingParams
from spool.engine.block_manager import BlockManager
from spool.engine.scheduler import Scheduler
from spool.engine.sequence import Sequence
from spool.engine.step_types import RunnerOutput
from spool.producer import Client
from spool.protocol import Keys
from spool.protocol.connection import connect
from spool.testing.stub_engine import StubEngine
from spool.testing.timed_runner import StepCost, TimedRunner, timed_runner
from spool.worker import loop
from spool.worker.gc_pacing import GcPacer
from spool.worker.loop import Worker
from spool.worker.settings import WorkerSettings

INTERACTIVE, BULK = 0, 1
KEYS = Keys()


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _scheduler(clock, cap=64, window=5.0, budget=256, max_num_seqs=16, reserve=0.0, split=False) -> Scheduler:
    return Scheduler(BlockManager(4096, 16), max_num_seqs, budget, 4096, [2], reserve, cap, window, split, clock)


_arrivals = iter(range(1_000_000))


def _seq(name: str, prompt_len: int, priority: int, max_tokens: int = 8) -> Sequence:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    arrival = next(_arrivals)
    prompt = [10 + (arrival * 7919 + j) % 30000 for j in range(prompt_len)]  # no shared prefixes
    return Sequence(f"{name}#0", name, 0, prompt, params, None, priority, arrival)


def _step(sched: Scheduler) -> list:
    """One synchronous step: schedule, then apply a token for every sampling chunk; returns the chunks."""
    out = sched.schedule()
    sched.update_from_output(out, RunnerOutput(sampled={c.seq_id: 5 for c in out.chunks if c.sample}))
    return list(zip(out.chunks, out.seqs))


def _bulk_prompt_tokens(chunks) -> int:
    return sum(len(c.token_ids) for c, seq in chunks if seq.priority > 0 and len(c.token_ids) > 1)


def test_bulk_prompt_tokens_are_capped_while_interactive_requests_keep_arriving():
    clock = _Clock()
    sched = _scheduler(clock)
    for i in range(6):
        sched.add(_seq(f"b{i}", 100, BULK))
    assert _bulk_prompt_tokens(_step(sched)) == 256  # no interactive request yet: the whole budget
    sched.add(_seq("i0", 40, INTERACTIVE, max_tokens=2))
    chunks = _step(sched)
    assert [c.seq_id for c, _ in chunks if len(c.token_ids) > 1] == ["i0#0"]  # its step: no bulk prompts
    for _ in range(4):
        clock.now += 1.0
        chunks = _step(sched)
        assert 0 < _bulk_prompt_tokens(chunks) <= 64  # short steps while interactive work is recent
    clock.now += 5.0  # the window has passed since the last interactive arrival
    assert _bulk_prompt_tokens(_step(sched)) > 64


def test_the_cap_never_limits_decodes_or_interactive_prompts():
    clock = _Clock()
    sched = _scheduler(clock, cap=16, budget=512)
    for i in range(4):
        sched.add(_seq(f"b{i}", 20, BULK, max_tokens=50))
    for _ in range(3):
        _step(sched)
    decoding = [s for s in sched.running if s.num_computed_tokens >= s.num_prompt_tokens]
    assert len(decoding) >= 1
    sched.add(_seq("i0", 200, INTERACTIVE))
    chunks = _step(sched)
    assert ("i0#0", 200) in [(c.seq_id, len(c.token_ids)) for c, _ in chunks]  # its whole prompt, uncapped
    clock.now += 0.5
    for s in [_seq(f"b{i}", 300, BULK) for i in range(4, 7)]:
        sched.add(s)
    chunks = _step(sched)
    decodes = {c.seq_id for c, seq in chunks if seq.priority == BULK and len(c.token_ids) == 1}
    assert {s.seq_id for s in decoding} <= decodes  # every running bulk decode still advances
    assert _bulk_prompt_tokens(chunks) <= 16


def test_offline_work_all_priority_0_is_never_capped():
    sched = _scheduler(_Clock())
    for i in range(6):
        sched.add(_seq(f"o{i}", 100, INTERACTIVE))
    chunks = _step(sched)
    assert sum(len(c.token_ids) for c, _ in chunks) == 256


def test_no_cap_when_disabled():
    clock = _Clock()
    sched = _scheduler(clock, cap=0)
    sched.add(_seq("i0", 10, INTERACTIVE, max_tokens=50))
    for i in range(6):
        sched.add(_seq(f"b{i}", 100, BULK))
    _step(sched)
    clock.now += 1.0
    assert _bulk_prompt_tokens(_step(sched)) == 256 - 3  # all but the three decodes (i0, b0, b1)


def _kind(chunks) -> str:
    """P: the step carries bulk prompt chunks, D: bulk decodes, PD: both, -: no bulk work."""
    prompts = _bulk_prompt_tokens(chunks) > 0
    decodes = any(seq.priority > 0 and len(c.token_ids) == 1 for c, seq in chunks)
    return ("P" if prompts else "") + ("D" if decodes else "") or "-"


def test_while_capped_bulk_prompts_and_bulk_decodes_take_turns():
    clock = _Clock()
    sched = _scheduler(clock, cap=64, split=True)
    for i in range(12):
        sched.add(_seq(f"b{i}", 100, BULK, max_tokens=50))
    assert _kind(_step(sched)) == "P"  # no interactive request yet: the whole budget (b0, b1 and part of b2)
    assert _kind(_step(sched)) == "PD"  # uncapped steps mix prompt chunks and decodes
    sched.add(_seq("i0", 20, INTERACTIVE, max_tokens=30))
    chunks = _step(sched)
    assert [(c.seq_id, len(c.token_ids)) for c, _ in chunks] == [("i0#0", 20)]  # its step: no bulk work at all
    kinds = []
    for _ in range(8):
        clock.now += 0.5
        chunks = _step(sched)
        assert "i0#0" in [c.seq_id for c, _ in chunks]  # interactive decodes run in every step
        assert _bulk_prompt_tokens(chunks) <= 64
        kinds.append(_kind(chunks))
    assert kinds == ["D", "P"] * 4  # the bulk decodes that sat out i0's step go first
    clock.now += 5.0  # the window has passed: steps mix again, at the whole budget
    chunks = _step(sched)
    assert _kind(chunks) == "PD" and _bulk_prompt_tokens(chunks) > 64


def test_split_steps_only_alternate_while_both_kinds_have_work():
    clock = _Clock()
    sched = _scheduler(clock, cap=64, split=True)
    sched.add(_seq("i0", 20, INTERACTIVE, max_tokens=40))  # the cap holds from here on
    for i in range(3):
        sched.add(_seq(f"b{i}", 100, BULK, max_tokens=6))
    kinds = []
    while any(s.priority == BULK for s in sched.seqs.values()):
        kinds.append(_kind(_step(sched)))
    # Nothing decodes until b0's prompt is done (prompt steps back to back), then turns; once every prompt is in,
    # decode steps back to back. Never both in one step, never a step without bulk work while some is left.
    assert kinds[:3] == ["P", "P", "D"]
    assert set(kinds) == {"P", "D"}
    assert kinds[-5:] == ["D"] * 5  # b2's last five tokens


def test_an_interactive_request_that_cannot_start_holds_no_bulk_decode_back():
    """The step of a waiting interactive request skips the bulk decodes only if that request starts in it;
    otherwise (its class's rows are full) the decodes run, or nothing would progress."""
    clock = _Clock()
    sched = _scheduler(clock, cap=64, max_num_seqs=2, reserve=0.5, split=True)  # 2 rows each class, 3 in all
    sched.add(_seq("i0", 20, INTERACTIVE, max_tokens=50))
    sched.add(_seq("i1", 20, INTERACTIVE, max_tokens=50))
    sched.add(_seq("b0", 30, BULK, max_tokens=50))
    _step(sched)
    _step(sched)
    sched.add(_seq("i2", 20, INTERACTIVE, max_tokens=50))  # priority-0 rows are full: it waits
    chunks = _step(sched)
    assert {c.seq_id for c, _ in chunks} == {"i0#0", "i1#0", "b0#0"}
    assert all(len(c.token_ids) == 1 for c, _ in chunks)


def test_split_steps_start_a_waiting_worse_priority_request_beside_a_still_worse_one():
    """Held back for a priority-1 request beside priority-2 work (the engine has any number of priorities): split
    steps treat it as bulk, so its prompt runs in a prompt step, not never."""
    clock = _Clock()
    sched = _scheduler(clock, cap=64, split=True)
    sched.add(_seq("i0", 20, INTERACTIVE, max_tokens=100))  # the cap holds
    for i in range(2):
        sched.add(_seq(f"c{i}", 30, 2, max_tokens=100))
    for _ in range(3):
        _step(sched)
    sched.add(_seq("b0", 30, BULK, max_tokens=5))
    started = [any(c.seq_id == "b0#0" for c, _ in _step(sched)) for _ in range(2)]
    assert any(started)


def test_engine_config_carries_the_cap_to_the_scheduler(tiny_llama):
    from spool.engine import LLMEngine

    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", interactive_prefill_tokens=512,
                                interactive_window_s=3.0, interactive_split_steps=False)
    s = eng.scheduler
    assert (s.interactive_prefill_tokens, s.interactive_window_s, s.interactive_split_steps) == (512, 3.0, False)
    s = LLMEngine.from_kwargs(str(tiny_llama), device="cpu").scheduler
    assert (s.interactive_prefill_tokens, s.interactive_split_steps) == (4096, True)


# -- the worker ----------------------------------------------------------------------------------


def _worker(engine, url: str, **kw) -> Worker:
    return Worker(engine, connect(url, fail_fast=True), WorkerSettings(redis_url=url, name="w", block_ms=20, **kw))


def test_an_idle_worker_launches_on_the_first_jobs_and_reads_the_rest_while_steps_compute(redis_url):
    client = Client(redis_url)
    client.enqueue_many([{"id": f"b{i}", "prompt_token_ids": [1, 2, 3], "max_tokens": 50, "priority": "bulk"}
                         for i in range(300)])
    engine = StubEngine(max_num_seqs=512)
    w = _worker(engine, redis_url)
    assert w.start()
    w.tick()  # idle: blocks for jobs, reads the first ones only
    assert len(w.inflight) == loop.READ_FIRST
    w.tick()  # launches on them, reads more while the step computes
    assert engine.step_sizes == [loop.READ_FIRST]
    assert len(w.inflight) == loop.READ_FIRST + loop.READ_PER_TICK
    w.tick()
    assert engine.step_sizes[-1] == loop.READ_FIRST + loop.READ_PER_TICK and len(w.inflight) == 300
    while w.inflight:
        w.tick()
    assert all(client.result(f"b{i}", timeout=5).status == "completed" for i in (0, 299))


def test_an_interactive_first_output_is_in_redis_before_the_next_launch(redis_server):
    """With a stream interval far longer than the job, the first token is the only write before the final."""
    client, r = Client(redis_server.url), redis_server.client()
    client.enqueue_many([{"id": f"b{i}", "prompt": "go", "max_tokens": 40, "stream": True, "priority": "bulk"}
                         for i in range(3)])
    engine = StubEngine(max_num_seqs=8)
    w = _worker(engine, redis_server.url, stream_interval_ms=60_000)
    assert w.start()
    for _ in range(3):
        w.tick()
    rid = client.enqueue("now", id="inter", max_tokens=5, stream=True)
    seen_at_launch: list[tuple[int, int]] = []  # (interactive stream length, a bulk stream length) per launch
    launch = engine.launch

    def watching_launch():
        seen_at_launch.append((r.xlen(KEYS.tokens(rid)), r.xlen(KEYS.tokens("b0"))))
        return launch()

    engine.launch = watching_launch
    while rid in w.inflight or not seen_at_launch:
        w.tick()
    # tick 1 admits it before its launch; tick 2 launches the step that collects its first token; tick 3's
    # launch already sees that token written.
    assert seen_at_launch[0][0] == 0 and seen_at_launch[2][0] == 1
    assert seen_at_launch[2][1] == seen_at_launch[1][1]  # a bulk job's stream waits for the tick's writes
    assert w._awaiting_first == set()
    events = list(client.stream(rid, timeout=5))
    assert [t for e in events for t in e.token_ids] == client.result(rid, timeout=5).token_ids


def test_gc_pacer_freezes_admitted_objects_and_collects_frozen_cycles_when_idle():
    clock = _Clock()
    pacer = GcPacer(full_every_s=60.0, clock=clock)
    gc.unfreeze()
    pacer.admitted()
    assert gc.get_freeze_count() == 0  # inactive until the worker loop runs
    pacer.activate()
    try:
        class Node:
            pass

        node = Node()
        node.self = node  # a cycle
        ref = weakref.ref(node)
        pacer.admitted()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # frozen: the collector does not walk it
        pacer.idle()
        assert pacer.full_collections == 0 and ref() is not None  # not due yet
        clock.now += 60.0
        pacer.idle()
        assert pacer.full_collections == 1 and ref() is None
        assert gc.get_freeze_count() > 0  # what survived is frozen again
    finally:
        pacer.release()
    assert gc.get_freeze_count() == 0 and not pacer.active


def test_a_running_worker_freezes_after_admitting_and_releases_when_it_stops(redis_url):
    client = Client(redis_url)
    client.enqueue_many([{"id": f"j{i}", "prompt": "go", "max_tokens": 3} for i in range(4)])
    gc.unfreeze()
    engine = StubEngine(max_num_seqs=8)
    frozen_at_launch = []
    launch = engine.launch

    def watching_launch():
        frozen_at_launch.append(gc.get_freeze_count())
        return launch()

    engine.launch = watching_launch
    w = _worker(engine, redis_url, max_jobs=4)
    assert w.run() == 0
    assert frozen_at_launch and all(n > 0 for n in frozen_at_launch)
    assert gc.get_freeze_count() == 0 and w.jobs_done == 4


# -- the real engine and worker on the simulated device ---------------------------------------------


FAST = StepCost(overhead_s=0.0002, weights_s=0.0003, per_token_s=2e-6, decode_ctx_s=2e-9, mixed_decode_ctx_s=4e-9,
                prompt_pair_s=1e-9)


def test_timed_runner_queues_steps_behind_each_other_at_their_cost():
    from spool.engine.step_types import ScheduledChunk, SchedulerOutput

    runner = TimedRunner(StepCost(overhead_s=0.01, weights_s=0.0, per_token_s=0.001, decode_ctx_s=0.002,
                                  mixed_decode_ctx_s=0.003, prompt_pair_s=0.0001), 100)

    def sched(lengths, start=0):
        chunks = [ScheduledChunk(f"s{i}", [1] * n, start, None, True, None, [], [], None, None)
                  for i, n in enumerate(lengths)]
        return SchedulerOutput(chunks=chunks, num_batched_tokens=sum(lengths))

    assert runner.cost.seconds(sched([10])) == pytest.approx(0.01 + 0.01 + 55 * 0.0001)  # 55 causal pairs
    assert runner.cost.seconds(sched([10], start=5)) == pytest.approx(0.01 + 0.01 + 105 * 0.0001)  # + 10 x 5
    # Decode rows pay per context token, more beside a prompt chunk (the prefill tiles).
    assert runner.cost.seconds(sched([1, 1], start=4)) == pytest.approx(0.01 + 0.002 + 2 * 5 * 0.002)
    assert runner.cost.seconds(sched([1, 10], start=4)) == pytest.approx(0.01 + 0.011 + 5 * 0.003 + 95 * 0.0001)
    t0 = time.perf_counter()
    first, second = runner.launch(sched([20])), runner.launch(sched([20]))
    assert time.perf_counter() - t0 < 0.01  # launches return at once
    assert second.result().sampled == {"s0": 1000}
    assert time.perf_counter() - t0 >= 0.06  # the second ran after the first
    assert first.done_at < second.done_at


def test_bulk_through_the_worker_takes_the_offline_steps_on_the_simulated_device(redis_url):
    """512 bulk jobs at max_num_seqs 512 run in one wave through Redis as offline: the priority reserve's rows
    are extra rows for interactive work, not rows taken from bulk (which left a second wave of ~25 jobs and
    ~220 extra small steps: 90.6% of offline on the simulated H200)."""
    from spool.worker.settings import WorkerSettings as Settings

    with timed_runner(FAST, num_blocks=4096):
        llm = LLM(str(shape_dir("llama3-8b")), load_format="dummy", max_model_len=1024, max_num_seqs=64,
                  max_num_batched_tokens=1024, async_scheduling=True, swap_space_bytes=0, priority_reserve=0.1)
    eng = llm.engine
    prompts = [list(range(100, 100 + 40 + 3 * i)) for i in range(64)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    before = eng.stats.num_steps
    offline = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    offline_steps = eng.stats.num_steps - before
    eng.block_manager.reset_prefix_cache()  # as bench/e2e.py: the Redis pass computes every prompt again
    client = Client(redis_url)
    client.enqueue_many([{"id": f"b{i}", "prompt_token_ids": p, "max_tokens": 20, "temperature": 0,
                          "ignore_eos": True, "priority": "bulk"} for i, p in enumerate(prompts)])
    w = Worker(eng, connect(redis_url, fail_fast=True),
               Settings(redis_url=redis_url, name="sim", block_ms=20, max_jobs=64))
    before = eng.stats.num_steps
    assert w.run() == 0
    assert eng.stats.num_steps - before == offline_steps
    for i in (0, 63):
        assert client.result(f"b{i}", timeout=5).token_ids == offline[i].outputs[0].token_ids


def test_split_steps_cost_bulk_less_device_time_beside_probes_on_the_calibrated_cost():
    """bench/schedule_sim.py on the H200-fitted StepCost: 256 bulk requests beside one probe every 300 ms, at
    the same cap. Mixed steps pay every bulk decode row's attention at the prefill tiles' rate; split steps
    do not, and the probes' first steps carry no bulk work."""
    from bench.schedule_sim import Workload, simulate

    wl = Workload(num_requests=256, probe_every_s=0.3)
    mixed = simulate(StepCost(), wl, 2048, split=False)
    split = simulate(StepCost(), wl, 2048, split=True)
    assert split["mixed_decode_rows"] < mixed["mixed_decode_rows"] / 3
    assert split["device_s"] < 0.99 * mixed["device_s"]
    assert split["ttft_ms_p90"] < mixed["ttft_ms_p90"]
    assert split["probes"] == mixed["probes"] >= 20


def test_interactive_rows_on_top_of_a_full_bulk_batch_displace_bulk_decodes_round_robin():
    """Decode steps keep max_num_seqs rows while priority-0 rows sit beyond a full bulk batch (rows past a round
    batch cost a tile row of every matmul): that many bulk decodes sit out each step, each bulk row in turn."""
    clock = _Clock()
    sched = _scheduler(clock, cap=0, budget=4096, max_num_seqs=32, reserve=0.0625)  # 2 extra priority-0 rows
    assert sched.max_rows == 34
    for i in range(32):
        sched.add(_seq(f"b{i}", 8, BULK, max_tokens=200))
    _step(sched)  # every prompt
    assert len(sched.running) == 32
    sched.add(_seq("i0", 8, INTERACTIVE, max_tokens=40))
    sched.add(_seq("i1", 8, INTERACTIVE, max_tokens=40))
    first = _step(sched)  # their prompts, beside all 32 bulk decodes (no split steps here)
    assert {c.seq_id for c, _ in first} >= {"i0#0", "i1#0"} and len(first) == 34
    bulk = [s for s in sched.running if s.priority == BULK]
    before = {s.seq_id: s.num_computed_tokens for s in bulk}
    for _ in range(16):
        chunks = _step(sched)
        ids = [c.seq_id for c, _ in chunks]
        assert len(chunks) == 32 and "i0#0" in ids and "i1#0" in ids  # 30 bulk decodes + the two interactive
        assert all(len(c.token_ids) == 1 for c, _ in chunks)
    advanced = sorted(s.num_computed_tokens - before[s.seq_id] for s in bulk)
    assert advanced[0] == 15 and advanced[-1] == 15  # 16 steps x 2 rows displaced = each of 32 rows sits out once


def test_no_bulk_decode_is_displaced_without_priority_0_rows_beyond_max_num_seqs():
    clock = _Clock()
    sched = _scheduler(clock, cap=0, budget=4096, max_num_seqs=32, reserve=0.0625)
    for i in range(30):  # the bulk batch is not full: the interactive rows fit in max_num_seqs
        sched.add(_seq(f"b{i}", 8, BULK, max_tokens=50))
    _step(sched)
    sched.add(_seq("i0", 8, INTERACTIVE, max_tokens=20))
    sched.add(_seq("i1", 8, INTERACTIVE, max_tokens=20))
    _step(sched)
    for _ in range(5):
        assert len(_step(sched)) == 32


def test_a_narrow_bulk_batch_beside_many_interactive_rows_is_never_displaced():
    """Displacing costs bulk over / n_bulk of its rows: past 1/16 no bulk decode sits out (nothing starves)."""
    clock = _Clock()
    sched = _scheduler(clock, cap=0, budget=4096, max_num_seqs=16, reserve=0.25)  # 4 extra rows
    for i in range(16):
        sched.add(_seq(f"i{i}", 8, INTERACTIVE, max_tokens=50))
    for i in range(4):
        sched.add(_seq(f"b{i}", 8, BULK, max_tokens=50))
    _step(sched)
    assert len(sched.running) == 20
    for _ in range(5):
        chunks = _step(sched)
        assert len(chunks) == 20 and sum(s.priority == BULK for _, s in chunks) == 4
