"""Interactive beside bulk: the priority-0 reserve of KV blocks and sequence slots, and swapping preempted KV."""
from __future__ import annotations

import random

import pytest
import torch

from engine import LLMEngine, SamplingParams
from tests.hf_reference import hf_greedy

INTERACTIVE, BULK = 0, 1


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def test_bulk_admission_leaves_the_reserve_and_interactive_starts_without_preemption(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=100, max_num_seqs=10,
                                priority_reserve=0.2)
    sched, bm = eng.scheduler, eng.block_manager
    assert (sched.reserved_blocks, sched.reserved_seqs) == (20, 2)
    bulk = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(14):
        eng.add_request(f"bulk{i}", _ids(40, i), bulk, priority=BULK)
    assert eng.admission_capacity(BULK) == 0  # 14 bulk sequences already wait for 10 - 2 slots
    for step in range(6):
        before = {s.seq_id for s in sched.running}
        eng.step()
        admitted = {s.seq_id for s in sched.running} - before
        assert len(sched.running) <= 8  # the reserved slots stay free of bulk
        if admitted:  # admission stopped before taking reserved blocks (running ones may grow into them)
            assert bm.num_free_blocks >= sched.reserved_blocks
        bm.check_invariants()
    assert sched.waiting  # bulk still queued: the reserve is what held it back
    inter = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng.add_request("inter0", _ids(12, 100), inter, priority=INTERACTIVE)
    eng.add_request("inter1", _ids(12, 101), inter, priority=INTERACTIVE)
    got = {d.request_id for d in eng.step() if d.new_token_ids}
    assert {"inter0", "inter1"} <= got  # both started in the next step
    assert sched.num_preemptions == 0
    while eng.has_unfinished_requests():
        eng.step()
    assert bm.num_used_blocks == 0


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


def test_swap_round_trips_kv_bytes_exactly(tiny_llama):
    """Every swapped-in block holds exactly the bytes its swapped-out block held."""
    eng = _swap_engine(tiny_llama)
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
                assert k[blocks].view(-1).view(torch.uint8).equal(k0.view(-1).view(torch.uint8))
                assert v[blocks].view(-1).view(torch.uint8).equal(v0.view(-1).view(torch.uint8))
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
