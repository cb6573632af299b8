"""The engine's per-step host fast paths give exactly the deltas of the general code they bypass.

Each run is compared with one where the fast paths are switched off: the detokenizer's byte-level pieces
(spool/engine/detokenizer.py) and LLMEngine._deltas' inline token handling (every token through _on_token).
"""
from __future__ import annotations

import random

import pytest

from spool.engine import LLMEngine, SamplingParams
from spool.engine.llm_engine import LLMEngine as _Engine


def _params(rng: random.Random) -> list[SamplingParams]:
    out = []
    for i in range(14):
        kw = dict(max_tokens=rng.randint(4, 40), ignore_eos=rng.random() < 0.7)
        if i % 2:
            kw.update(temperature=1.0, seed=100 + i)
        else:
            kw.update(temperature=0.0)
        if i % 3 == 0:
            kw.update(stop=rng.sample([" the", "e", ".", "and", "\n", "o w", "🙂"], 2),
                      include_stop_str_in_output=rng.random() < 0.5)
        if i % 4 == 1:
            kw.update(min_tokens=rng.randint(1, 4))
        if i % 5 == 2:
            kw.update(logprobs=2)
        if i % 6 == 3:
            kw.update(n=2)
        if i % 7 == 4:
            kw.update(skip_special_tokens=False)
        out.append(SamplingParams(**kw))
    # Frequent stop strings that min_tokens holds back at first.
    out += [SamplingParams(temperature=t, seed=3, max_tokens=30, stop=["e", " "], min_tokens=m, ignore_eos=True)
            for t, m in ((0.0, 3), (1.0, 2), (1.0, 5))]
    return out


def _run(model_dir, async_scheduling: bool, fast: bool, monkeypatch) -> list[tuple]:
    engine = LLMEngine.from_kwargs(str(model_dir), device="cpu", block_size=8, max_num_seqs=6,
                                   num_kv_blocks=48, async_scheduling=async_scheduling)
    with monkeypatch.context() as m:
        if not fast:
            m.setattr("spool.engine.detokenizer._token_pieces", lambda tok, skip: None)
            m.setattr(_Engine, "_deltas", lambda self, seqs, result: [
                self._on_token(s, result.logprobs.get(s.seq_id), result.ranks.get(s.seq_id)) for s in seqs])
        rng = random.Random(5)
        prompts = ["Once upon a time", "The café in 東京 🙂", "and then", "Hello world. The end"]
        params = _params(rng)
        for i, p in enumerate(params):
            engine.add_request(f"r{i}", prompts[i % len(prompts)] * (1 + i % 3), p)
        longest = max(range(len(params)), key=lambda i: (params[i].ignore_eos and not params[i].stop,
                                                         params[i].max_tokens))
        deltas, step = [], 0
        while engine.has_unfinished_requests():
            step += 1
            if step == 5:
                engine.abort(f"r{longest}")
            deltas += [(step, d.request_id, d.index, tuple(d.new_token_ids), d.new_text, d.finished,
                        d.finish_reason, d.stop_reason, repr(d.new_logprobs), d.error) for d in engine.step()]
    return deltas


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_fast_paths_match_general_paths(tiny_llama, async_scheduling, monkeypatch):
    fast = _run(tiny_llama, async_scheduling, True, monkeypatch)
    slow = _run(tiny_llama, async_scheduling, False, monkeypatch)
    assert fast == slow
    reasons = {d[6] for d in fast if d[5]}
    assert {"stop", "length", "abort"} <= reasons  # the workload reaches every ending


def test_generate_keeps_the_collector_out_of_its_steps(tiny_llama):
    """LLM.generate moves the admitted requests' objects out of the cyclic GC's reach (as the worker does), so
    full collections during its steps do not walk them, and raises the young threshold while it steps
    (spool/engine/step_gc.py)."""
    import gc

    from spool.engine import LLM

    from spool.engine.step_gc import GEN0_PER_ROW

    llm = LLM(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4)
    seen, thresholds = [], []
    real_step = llm.engine.step
    before = gc.get_threshold()

    def step():
        req = next(iter(llm.engine.requests.values()), None)
        if req is not None and not seen:
            seen.append(not gc.is_tracked(req) or req not in gc.get_objects())
        thresholds.append(gc.get_threshold())
        return real_step()

    llm.engine.step = step
    try:
        outs = llm.generate([[5, 6, 7]] * 3, SamplingParams(max_tokens=3, ignore_eos=True))
    finally:
        gc.unfreeze()
        gc.freeze()  # leave the session's heap as frozen as LLMEngine leaves it
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3, 3]
    assert seen == [True]  # gc.get_objects() lists only unfrozen objects
    # Young collections left to real growth while it steps; the thresholds are the caller's again after.
    rows = llm.engine.config.max_running_seqs
    assert thresholds and all(t == (max(before[0], GEN0_PER_ROW * rows), *before[1:]) for t in thresholds)
    assert gc.get_threshold() == before
