"""Async scheduling with grammar, penalty and min_tokens rows (spool/engine/async_step.py): step N+1's forward pass is
queued before step N is applied, its sampling after; outputs are token-for-token those of synchronous steps."""
from __future__ import annotations

import random

import pytest
import torch

from spool.engine import LLMEngine, SamplingParams, StructuredOutputsParams as SO
from spool.engine.grammar import SequenceGrammar
from tests.test_async_scheduling import _ids, _same, drive
from tests.test_structured_outputs import CHOICES, EBNF, FINITE, PERSON, REGEX


def _so(spec: SO, **kw) -> SamplingParams:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 40)
    return SamplingParams(structured_outputs=spec, **kw)


def _mixed_requests() -> list:
    """Grammar kinds with n > 1 and seeds, next to plain rows, stops, min_tokens, penalties and logprobs.

    Sampled rows are all seeded: an unseeded row draws from torch's global generator, whose stream depends
    on the batch (async scheduling samples one extra, discarded row for a sequence that just stopped)."""
    plain = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    specs = [
        ("person", _so(SO(json=PERSON), temperature=1.0, seed=3, n=2, max_tokens=60)),
        ("finite", _so(SO(json=FINITE))),
        ("finite-ign", _so(SO(json=FINITE), temperature=1.0, seed=8, ignore_eos=True)),  # the grammar ends it
        ("regex", _so(SO(regex=REGEX), temperature=0.7, seed=11)),
        ("choice", _so(SO(choice=CHOICES), temperature=1.5, seed=2, n=3)),
        ("ebnf", _so(SO(grammar=EBNF), temperature=1.0, seed=5)),
        ("object", _so(SO(json_object=True), temperature=1.0, seed=6, max_tokens=12)),  # stops by length
        ("stopstr", _so(SO(grammar='root ::= "hello world, bye"'), stop=["world"])),
        ("mintok", _so(SO(regex="[a-z]+"), temperature=1.0, seed=2, n=2, min_tokens=8, max_tokens=20)),
        ("mintok-end", _so(SO(choice=["ok"]), min_tokens=10)),  # the grammar can only end: EOS comes early
        ("penalty", _so(SO(json=PERSON), temperature=1.0, seed=4, repetition_penalty=2.0, frequency_penalty=1.5,
                        presence_penalty=1.0, max_tokens=50)),
        ("logprobs", _so(SO(regex=REGEX), logprobs=3)),
        ("plain", plain),
        ("plain-seeded", SamplingParams(temperature=0.9, seed=1, n=2, max_tokens=10)),
        ("plain-min", SamplingParams(temperature=0, max_tokens=10, min_tokens=6)),
    ]
    return [(rid, _ids(4 + 3 * i, 60 + i), p, 0) for i, (rid, p) in enumerate(specs)]


@pytest.mark.parametrize("engine_kw", [
    {"max_num_seqs": 24},
    {"max_num_seqs": 6, "max_num_batched_tokens": 24},  # chunked prefill, admissions while others decode
], ids=["roomy", "chunked"])
def test_async_grammar_equals_sync(tiny_llama, engine_kw):
    reqs = _mixed_requests()
    sync, _ = drive(tiny_llama, False, reqs, **engine_kw)
    asynced, eng = drive(tiny_llama, True, reqs, **engine_kw)
    _same(asynced, sync)
    # Split launches filled their masks in the background (spool/engine/grammar_mask.py), always for the right rows.
    assert eng.runner.sampler.masks._thread is not None and eng.runner.sampler.masks.num_refills == 0
    finishes = {rid: rec["finish"] for (rid, _), rec in sync.items()}
    assert finishes["stopstr"] == ("stop", "world") and finishes["object"][0] == "length"
    assert finishes["finite-ign"] == ("stop", None) and finishes["mintok-end"] == ("stop", None)
    assert all(rec["finish"][0] != "error" for rec in asynced.values())


def test_threaded_accept_and_fill_equal_sync(tiny_llama, monkeypatch):
    """xgrammar's batch accept split over threads and its fill on several threads (as on a many-core host):
    outputs equal a synchronous single-threaded run."""
    import spool.engine.grammar as grammar_mod

    reqs = _mixed_requests()
    sync, _ = drive(tiny_llama, False, reqs, max_num_seqs=24)
    monkeypatch.setattr(grammar_mod, "host_threads", lambda: 3)
    monkeypatch.setattr(SequenceGrammar, "_ACCEPT_CHUNK", 2)
    monkeypatch.setattr(SequenceGrammar, "_THREADED_FROM", 0)
    calls = []
    accept = grammar_mod._batch_accept
    monkeypatch.setattr(grammar_mod, "_batch_accept", lambda h, t: calls.append(len(h)) or accept(h, t))
    asynced, _ = drive(tiny_llama, True, reqs, max_num_seqs=24)
    _same(asynced, sync)
    assert max(calls) < 10 < len(calls)  # the accepts went out in chunks


def test_grammar_steps_overlap_the_previous_apply(tiny_llama):
    """Each decode step of a grammar batch: forward queued (input token fed on the device), then the previous
    step applied (matchers advanced), then the sampling queued with masks from the advanced matchers."""
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, async_scheduling=True)
    runner, sched = eng.runner, eng.scheduler
    events: list[tuple] = []

    def wrap(obj, name, record):
        fn = getattr(obj, name)

        def wrapped(*args, **kwargs):
            sched_out = getattr(args[0], "sched", args[0])  # a SchedulerOutput, or a ForwardInFlight's
            if sched_out.chunks:  # steps with nothing to compute (only finished sequences to drop) left out
                record(*args, **kwargs)
            return fn(*args, **kwargs)
        setattr(obj, name, wrapped)

    wrap(runner, "launch", lambda s, previous=None: events.append(("whole",)))
    wrap(runner, "launch_forward", lambda s, previous=None: events.append(("forward", len(s.device_input_rows))))
    wrap(sched, "update_from_output", lambda s, r: events.append(("apply",)))
    # Per sampled chunk: tokens the sequence holds on the host beyond the chunk's end (0: the forward pass's
    # last input, fed on the device, has been applied; -1: it has not).
    wrap(runner, "launch_sampling", lambda f, *_: events.append(
        ("sample", {len(c.all_token_ids) - c.start_pos - len(c.token_ids) for c in f.sched.chunks})))
    for i in range(3):
        eng.add_request(f"g{i}", _ids(6 + i, i), _so(SO(regex="[a-z]{8,40}"), temperature=1.0, seed=i))
    while eng.has_unfinished_requests():
        eng.collect(eng.launch())
    # The prefill step launches whole (nothing to apply yet); every decode step is split around an apply.
    assert events[:3] == [("whole",), ("forward", 0), ("sample", {0})]
    i = 3
    while events[i][0] == "forward":
        assert events[i][1] > 0  # its input tokens come from the previous step's sampled tensor
        assert events[i + 1 : i + 3] == [("apply",), ("sample", {0})]
        i += 3
    assert events[i:] == [("apply",)] and i >= 3 * 8  # the last step, applied by collect()
    assert eng.stats.num_steps == i // 3 + 1


def test_terminated_matchers_are_never_asked_for_a_mask(tiny_llama, monkeypatch):
    """A sequence whose grammar ended at step N still has a row in step N+1: it is sampled unmasked (xgrammar
    refuses to fill a terminated matcher) and its token is dropped."""
    fill_many = SequenceGrammar.fill_many.__func__
    filled = []

    def checked(cls, grammars, bitmask):
        assert not any(g.terminated or g.error for g in grammars)
        filled.append(len(grammars))
        return fill_many(cls, grammars, bitmask)

    monkeypatch.setattr(SequenceGrammar, "fill_many", classmethod(checked))
    p = _so(SO(json=FINITE), temperature=1.0, seed=1, n=4, ignore_eos=True, max_tokens=80)  # the grammar's end finishes them
    q = _so(SO(choice=["a", "bb", "ccc"]), temperature=1.0, seed=2, n=3)  # EOS finishes these
    reqs = [("finite", _ids(5, 1), p, 0), ("choice", _ids(7, 2), q, 0)]
    sync, _ = drive(tiny_llama, False, reqs)
    asynced, _ = drive(tiny_llama, True, reqs)
    _same(asynced, sync)
    assert filled and all(rec["finish"] == ("stop", None) for rec in asynced.values())


def test_async_grammar_aborts_and_late_adds_equal_sync(tiny_llama):
    p = _so(SO(json=PERSON), temperature=1.0, seed=7, max_tokens=30)
    reqs = [(f"a{i}", _ids(9 + i, i), p.model_copy(update={"seed": i}), 0) for i in range(4)]

    def on_delta(eng, d, rec):
        if d.request_id == "a1" and len(rec["tokens"]) == 3 and not d.finished:
            eng.abort("a1")
        if d.request_id == "a0" and len(rec["tokens"]) == 2 and "late" not in eng.requests:
            eng.add_request("late", {"prompt_token_ids": _ids(15, 7)}, _so(SO(regex=REGEX), n=2, seed=1,
                                                                            temperature=1.0))

    sync, _ = drive(tiny_llama, False, reqs, on_delta, num_kv_blocks=40)
    asynced, _ = drive(tiny_llama, True, reqs, on_delta, num_kv_blocks=40)
    _same(asynced, sync)
    assert sync[("a1", 0)]["finish"][0] == "abort" and len(sync[("a1", 0)]["tokens"]) == 3
    assert ("late", 1) in sync


def test_grammar_preempted_with_a_pending_token_equals_sync(tiny_llama, monkeypatch):
    """Interactive requests preempt bulk grammar sequences whose token is still on the device (by recompute and
    by swap): the matcher takes that token when it arrives, and outputs equal a roomy synchronous run."""
    from spool.engine.scheduler import Scheduler

    preempted_pending = []
    preempt = Scheduler._preempt

    def spy(self, seq):
        preempted_pending.append(seq.grammar is not None and seq.num_pending_tokens > 0)
        preempt(self, seq)

    rng = random.Random(3)
    specs = [SO(json=PERSON), SO(regex=REGEX), SO(grammar=EBNF), SO(json=FINITE), SO(choice=CHOICES)]
    reqs = [(f"bulk{i}", _ids(rng.randrange(10, 30), i),
             _so(specs[i % len(specs)], temperature=rng.choice([0.0, 1.0]), seed=i, max_tokens=30,
                 n=rng.choice([1, 2])), 1) for i in range(6)]

    def on_delta(eng, d, rec):
        if d.request_id == "bulk0" and len(rec["tokens"]) in (3, 9, 15):
            rid = f"inter{len(rec['tokens'])}"
            if rid not in eng.requests:
                eng.add_request(rid, {"prompt_token_ids": _ids(12, 99)}, _so(SO(regex=REGEX), max_tokens=8),
                                priority=0)

    roomy, _ = drive(tiny_llama, False, reqs, on_delta, num_kv_blocks=300, max_num_seqs=6, priority_reserve=0.0)
    monkeypatch.setattr(Scheduler, "_preempt", spy)
    for swap in ({}, {"swap_space_bytes": 1 << 24, "swap_min_tokens": 12}):
        preempted_pending.clear()
        tight, eng = drive(tiny_llama, True, reqs, on_delta, num_kv_blocks=18, max_num_seqs=6, **swap)
        assert any(preempted_pending), swap
        if swap:
            assert eng.scheduler.num_swapped_out > 0 and not eng.swap_space.host
        _same(tight, roomy)


def test_rejected_token_finishes_with_error_under_async(tiny_llama, monkeypatch):
    """A token the matcher rejects ends its sequence with an error; its row in the step already launched goes
    unmasked and its token is dropped."""
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, async_scheduling=True)
    eng.add_request("ok", _ids(5, 1), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    eng.add_request("x", _ids(5, 0), _so(SO(regex="[a-z]+")))
    reject = lambda g, t: setattr(g, "error", f"no {t}") or False  # noqa: E731
    monkeypatch.setattr(SequenceGrammar, "accept", reject)
    monkeypatch.setattr(SequenceGrammar, "accept_many", staticmethod(lambda gs, ts: list(map(reject, gs, ts))))
    final, tokens = {}, {}
    while eng.has_unfinished_requests():
        for d in eng.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
            if d.finished:
                final[d.request_id] = d
    assert final["x"].finish_reason == "error" and final["x"].error.startswith("structured output: no ")
    assert len(tokens["x"]) == 1 and final["ok"].finish_reason == "length" and len(tokens["ok"]) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [True, False])
def test_async_grammar_on_cuda_equals_sync(tiny_llama, eager):
    """On CUDA (decode graphs replayed, input tokens fed on the device, bitmasks copied from pinned memory while
    the forward pass runs): grammar batches with stops, seeds, n > 1 and preemption equal synchronous steps."""
    from spool.engine import LLM

    reqs = _mixed_requests()
    outs = {}
    for mode in (False, True):
        llm = LLM(str(tiny_llama), device="cuda", dtype="float32", block_size=16, max_num_seqs=8,
                  enforce_eager=eager, num_kv_blocks=12, async_scheduling=mode)
        assert llm.engine.async_scheduling is mode and (llm.engine.runner.graphs is None) == eager
        res = llm.generate([{"prompt_token_ids": prompt} for _, prompt, _, _ in reqs], [p for _, _, p, _ in reqs])
        outs[mode] = [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in res]
        assert llm.engine.block_manager.num_used_blocks == 0
    assert llm.engine.scheduler.num_preemptions > 0
    assert outs[True] == outs[False]
