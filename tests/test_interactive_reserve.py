"""Interactive beside bulk: the priority-0 reserve of KV blocks and sequence slots, and swapping preempted KV."""
from __future__ import annotations

import random

from engine import LLMEngine, SamplingParams

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
