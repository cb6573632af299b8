"""Interactive beside bulk: the priority-0 reserve of KV blocks and sequence slots, and swapping preempted KV."""
from __future__ import annotations

import random

import pytest
import torch

from spool.engine import LLMEngine, SamplingParams
from tests.hf_reference import hf_greedy

INTERACTIVE, BULK = 0, 1


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def test_bulk_keeps_max_num_seqs_and_interactive_rows_come_on_top_without_preemption(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=200, max_num_seqs=10,
                                priority_reserve=0.2)
    sched, bm = eng.scheduler, eng.block_manager
    assert (sched.reserved_blocks, sched.reserved_seqs, sched.max_rows) == (40, 2, 12)
    assert eng.config.max_running_seqs == sched.max_rows
    bulk = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(14):
        eng.add_request(f"bulk{i}", _ids(40, i), bulk, priority=BULK)
    assert eng.admission_capacity(BULK) == 0  # 14 bulk sequences already wait for 10 rows
    assert eng.admission_capacity(INTERACTIVE) == 10
    for step in range(6):
        before = {s.seq_id for s in sched.running}
        eng.step()
        admitted = {s.seq_id for s in sched.running} - before
        assert len(sched.running) <= 10  # bulk holds at most max_num_seqs rows, as offline work does
        if admitted:  # admission stopped before taking reserved blocks (running ones may grow into them)
            assert bm.num_free_blocks >= sched.reserved_blocks
        bm.check_invariants()
    assert len(sched.running) == 10 and sched.waiting  # a full bulk batch, more bulk queued
    inter = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng.add_request("inter0", _ids(12, 100), inter, priority=INTERACTIVE)
    eng.add_request("inter1", _ids(12, 101), inter, priority=INTERACTIVE)
    eng.add_request("inter2", _ids(12, 102), inter, priority=INTERACTIVE)
    got = {d.request_id for d in eng.step() if d.new_token_ids}
    assert {"inter0", "inter1"} <= got and "inter2" not in got  # the two extra rows, beside all ten bulk
    assert len(sched.running) == 12 and sched.num_preemptions == 0
    assert sum(s.priority == BULK for s in sched.running) == 10
    while eng.has_unfinished_requests():
        eng.step()
        assert len(sched.running) <= 12
    assert bm.num_used_blocks == 0


def test_interactive_alone_never_exceeds_max_num_seqs(tiny_llama):
    """The extra rows exist beside bulk work only: priority-0 work alone (the offline LLM) runs max_num_seqs."""
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=200, max_num_seqs=4,
                                priority_reserve=0.5)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in range(9):
        eng.add_request(f"i{i}", _ids(10, i), p, priority=INTERACTIVE)
    widest = 0
    while eng.has_unfinished_requests():
        eng.step()
        widest = max(widest, len(eng.scheduler.running))
    assert widest == 4


def test_interactive_preempts_bulk_only_past_the_extra_rows(tiny_llama):
    """Priority-0 work fills the extra rows first; only beyond them does it preempt bulk (and never to exceed
    max_num_seqs priority-0 rows of its own)."""
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=200, max_num_seqs=4,
                                priority_reserve=0.25)
    sched = eng.scheduler
    bulk = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        eng.add_request(f"b{i}", _ids(10, i), bulk, priority=BULK)
    eng.step()
    assert len(sched.running) == 4
    inter = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    eng.add_request("i0", _ids(10, 50), inter, priority=INTERACTIVE)
    eng.step()
    assert len(sched.running) == 5 and sched.num_preemptions == 0  # the one extra row
    for j in range(1, 5):
        eng.add_request(f"i{j}", _ids(10, 50 + j), inter, priority=INTERACTIVE)
    for _ in range(4):  # each step makes room for the waiting head
        eng.step()
    best = [s for s in sched.running if s.priority == INTERACTIVE]
    assert len(best) == 4 and len(sched.running) == 5  # priority-0 at max_num_seqs; one bulk row left
    assert sched.num_preemptions == 3 and len(sched.waiting) == 4  # three bulk preempted, i4 waits
    while eng.has_unfinished_requests():
        eng.step()
        assert len(sched.running) <= 5
        eng.block_manager.check_invariants()


def test_reserve_changes_no_output(tiny_llama):
    reqs = [(f"b{i}", _ids(20 + i, i), BULK) for i in range(6)] + [("i", _ids(9, 50), INTERACTIVE)]
    outs = []
    for reserve in (0.0, 0.25):
        eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=24, max_num_seqs=4,
                                    priority_reserve=reserve)
        p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        for rid, prompt, prio in reqs:
            eng.add_request(rid, {"prompt_token_ids": prompt}, p, priority=prio)
        tokens: dict[str, list[int]] = {}
        while eng.has_unfinished_requests():
            for d in eng.step():
                tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
            eng.block_manager.check_invariants()
        outs.append(tokens)
    assert outs[0] == outs[1]


def _swap_engine(model, **kw):
    base = {"block_size": 8, "num_kv_blocks": 14, "max_num_seqs": 8, "priority_reserve": 0.0,
            "swap_space_bytes": 1 << 24, "swap_min_tokens": 20}
    return LLMEngine.from_kwargs(str(model), device="cpu", **{**base, **kw})


def _run(eng, requests) -> dict[str, list[int]]:
    for rid, prompt, params, prio in requests:
        eng.add_request(rid, {"prompt_token_ids": prompt}, params, priority=prio)
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for d in eng.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
        eng.block_manager.check_invariants()
        sched = eng.scheduler
        assert 0 <= sched.host_blocks_free <= sched.host_blocks
    assert eng.block_manager.num_used_blocks == 0
    assert eng.scheduler.host_blocks_free == eng.scheduler.host_blocks and not eng.swap_space.host
    return tokens


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_swap_round_trips_kv_bytes_exactly(tiny_llama, kv_cache_dtype):
    """Every swapped-in block holds exactly the bytes its swapped-out block held, for either KV dtype."""
    eng = _swap_engine(tiny_llama, kv_cache_dtype=kv_cache_dtype)
    space = eng.swap_space
    saved: dict[str, list] = {}
    checked = []
    apply = space.apply

    def checking_apply(sched):
        for seq_id, blocks in sched.swap_out:
            saved[seq_id] = [(k[blocks].clone(), v[blocks].clone()) for k, v in space.kv_caches]
        apply(sched)
        for seq_id, blocks in sched.swap_in:
            for (k, v), (k0, v0) in zip(space.kv_caches, saved.pop(seq_id)):
                assert k[blocks].view(torch.uint8).equal(k0.view(torch.uint8))
                assert v[blocks].view(torch.uint8).equal(v0.view(torch.uint8))
            checked.append(seq_id)

    space.apply = checking_apply
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    _run(eng, [(f"r{i}", _ids(22 + i, i), p, 0) for i in range(6)])
    assert checked and eng.scheduler.num_swapped_out >= len(checked)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_swapped_preemption_output_equals_no_preemption_and_transformers(tiny_llama, async_scheduling):
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reqs = [(f"r{i}", _ids((22, 9, 30, 14)[i % 4] + i, i), p, 0) for i in range(6)]
    roomy = _run(_swap_engine(tiny_llama, num_kv_blocks=200), reqs)
    eng = _swap_engine(tiny_llama, async_scheduling=async_scheduling, swap_min_tokens=34)
    tight = _run(eng, reqs)
    sched = eng.scheduler
    assert sched.num_swapped_out > 0 and sched.num_preemptions > sched.num_swapped_out  # both swap and recompute
    assert tight == roomy
    for rid, prompt, _, _ in reqs:
        assert tight[rid] == hf_greedy(tiny_llama, prompt, 20), rid


def test_swap_with_bulk_and_interactive_priorities_and_aborts(tiny_llama):
    """Interactive work swaps bulk out; a swapped bulk request aborted while waiting frees its host copy."""
    bulk = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eng = _swap_engine(tiny_llama, num_kv_blocks=16, max_num_seqs=4)
    for i in range(4):
        eng.add_request(f"bulk{i}", {"prompt_token_ids": _ids(24, i)}, bulk, priority=BULK)
    for _ in range(4):
        eng.step()
    for j in range(2):
        eng.add_request(f"inter{j}", {"prompt_token_ids": _ids(30, 60 + j)},
                        SamplingParams(temperature=0, max_tokens=4), priority=INTERACTIVE)
    eng.step()
    swapped = [s for s in eng.scheduler.waiting if s.swapped_blocks]
    assert swapped, "no bulk sequence was swapped out for the interactive ones"
    eng.abort(swapped[0].request_id)
    while eng.has_unfinished_requests():
        eng.step()
        eng.block_manager.check_invariants()
    assert eng.block_manager.num_used_blocks == 0
    assert eng.scheduler.host_blocks_free == eng.scheduler.host_blocks and not eng.swap_space.host
