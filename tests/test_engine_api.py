"""The offline and incremental APIs: sampling features, stops, n > 1, errors, aborts, streaming deltas."""
from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from spool.engine import LLM, ConfigError, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=16)


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def test_accepts_strings_ids_and_dicts_in_order(llm):
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = _ids(9, 0)
    outs = llm.generate(["Once upon a time", ids, {"prompt_token_ids": ids}], p)
    assert [o.request_id for o in outs] == sorted({o.request_id for o in outs}, key=[o.request_id for o in outs].index)
    assert outs[0].prompt == "Once upon a time"
    assert outs[0].prompt_token_ids == llm.get_tokenizer().encode("Once upon a time")
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    text = outs[1].outputs[0].text
    assert text == llm.get_tokenizer().decode(outs[1].outputs[0].token_ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    target = {"prompt_token_ids": _ids(7, 1)}
    alone = llm.generate([target], p)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": _ids(5 + i, 10 + i)} for i in range(5)]
    other_params = [SamplingParams(temperature=0.8, max_tokens=6 + i) for i in range(5)]
    batched = llm.generate(others[:3] + [target] + others[3:], other_params[:3] + [p] + other_params[3:])
    assert batched[3].outputs[0].token_ids == alone
    again = llm.generate([target], p)[0].outputs[0].token_ids
    assert again == alone
    different = llm.generate([target], p.model_copy(update={"seed": 99}))[0].outputs[0].token_ids
    assert different != alone


def test_n_parallel_samples(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": _ids(6, 2)}, p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = llm.generate({"prompt_token_ids": _ids(6, 2)}, SamplingParams(n=2, temperature=0, max_tokens=5))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_stop_token_ids(llm):
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = {"prompt_token_ids": _ids(8, 3)}
    full = llm.generate(prompt, base)[0].outputs[0].token_ids
    stop_tok = full[4]
    first = full.index(stop_tok)
    out = llm.generate(prompt, base.model_copy(update={"stop_token_ids": [stop_tok]}))[0].outputs[0]
    assert out.token_ids == full[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    tok = llm.get_tokenizer()
    assert out.text == tok.decode(full[:first], skip_special_tokens=True)


def test_stop_strings_are_cut_from_text(llm):
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = {"prompt_token_ids": _ids(8, 4)}
    full = llm.generate(prompt, base)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate(prompt, base.model_copy(update={"stop": [stop]}))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    kept = llm.generate(prompt, base.model_copy(update={"stop": [stop], "include_stop_str_in_output": True}))
    assert kept[0].outputs[0].text == full[: full.index(stop) + len(stop)]


def test_min_tokens_and_eos(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", block_size=8)
    eos = llm.get_tokenizer().eos_token_id
    p = SamplingParams(temperature=0, max_tokens=6, min_tokens=6, stop_token_ids=[eos])
    out = llm.generate({"prompt_token_ids": _ids(5, 5)}, p)[0].outputs[0]
    assert len(out.token_ids) == 6 and eos not in out.token_ids


def test_logprobs(llm):
    p = SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": _ids(6, 6)}, p)[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, pos in zip(out.token_ids, out.logprobs):
        assert tok in pos and 3 <= len(pos) <= 4
        assert pos[tok].rank == 1  # greedy picks the most likely token
        assert all(lp.logprob <= 0 for lp in pos.values())
    assert out.cumulative_logprob == pytest.approx(sum(pos[t].logprob for t, pos in zip(out.token_ids, out.logprobs)))


def test_chat_template(llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    rendered = llm.get_tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt == rendered and len(out.outputs[0].token_ids) == 5


@pytest.mark.parametrize("bad", [
    {"temperature": -1}, {"top_p": -0.1}, {"top_p": 1.5}, {"max_tokens": 0}, {"n": 0}, {"min_p": 2},
    {"temperature": float("nan")}, {"logprobs": 100}, {"stop": [""]}, {"min_tokens": 5, "max_tokens": 2},
    {"repetition_penalty": 0}, {"presence_penalty": 3}, {"unknown_field": 1},
    {"logit_bias": {5: 101}}, {"logit_bias": {-1: 1.0}}, {"logit_bias": {5: float("nan")}},
    {"structured_outputs": {}}, {"structured_outputs": {"regex": "a", "choice": ["a"]}},
    {"structured_outputs": {"choice": []}}, {"structured_outputs": {"json": "{not json"}},
    {"structured_outputs": {"json": "[1]"}}, {"structured_outputs": {"json_object": False}},
    {"structured_outputs": {"yaml": "a: 1"}},
])
def test_bad_sampling_params_rejected(bad):
    with pytest.raises(ValidationError):
        SamplingParams(**bad)


def test_requests_that_can_never_fit_finish_with_error(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=6, max_model_len=128)
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": _ids(125, 7)}, {"prompt_token_ids": _ids(60, 8)},
                         {"prompt_token_ids": _ids(5, 9)}], p)
    assert outs[0].outputs[0].finish_reason == "error" and "max_model_len" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "error" and "KV blocks" in outs[1].error
    assert outs[2].outputs[0].finish_reason == "length"


def test_bad_engine_config_and_dirs(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="config.json"):
        LLM(str(tmp_path), device="cpu")
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(str(tiny_llama), device="cpu", blocksize=8)
    with pytest.raises(ConfigError, match="block_size"):
        LLM(str(tiny_llama), device="cpu", block_size=7)


def test_abort_frees_blocks_and_reports(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
    p = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i in range(4):
        eng.add_request(f"r{i}", _ids(20, i), p)
    for _ in range(3):
        eng.step()
    assert eng.block_manager.num_used_blocks > 0
    assert eng.abort("r1") and not eng.abort("nope")
    deltas = eng.step()
    ab = [d for d in deltas if d.request_id == "r1"]
    assert len(ab) == 1 and ab[0].finished and ab[0].finish_reason == "abort"
    for i in (0, 2, 3):
        eng.abort(f"r{i}")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.block_manager.num_used_blocks == 0 and not eng.requests


def test_random_add_abort_keeps_block_invariants(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=24, max_num_seqs=6)
    rng = random.Random(0)
    live: set[str] = set()
    for step in range(120):
        if rng.random() < 0.3:
            rid = f"q{step}"
            eng.add_request(rid, _ids(rng.randrange(1, 30), step),
                            SamplingParams(temperature=rng.choice([0, 1.0]), max_tokens=rng.randrange(1, 20),
                                           n=rng.choice([1, 1, 2]), ignore_eos=True))
            live.add(rid)
        if live and rng.random() < 0.1:
            eng.abort(rng.choice(sorted(live)))
        for d in eng.step():
            if d.finished and d.request_id not in eng.requests:
                live.discard(d.request_id)
        eng.block_manager.check_invariants()
    while eng.has_unfinished_requests():
        eng.step()
    eng.block_manager.check_invariants()
    assert eng.block_manager.num_used_blocks == 0 and not eng.requests


def test_streamed_deltas_concatenate_to_final_text(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
    prompts = ["héllo wörld", "日本語のテキスト", "emoji 🎉🎉 time", "plain words"]
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)
    for i, pr in enumerate(prompts):
        eng.add_request(f"s{i}", pr, p)
    streamed = {f"s{i}": "" for i in range(len(prompts))}
    finals = {}
    reqs = dict(eng.requests)
    while eng.has_unfinished_requests():
        for d in eng.step():
            assert "\ufffd" not in d.new_text or "\ufffd" in reqs[d.request_id].outputs[0].text
            streamed[d.request_id] += d.new_text
            if d.finished:
                finals[d.request_id] = reqs[d.request_id].outputs[0].text
    assert streamed == finals


def test_stop_string_before_min_tokens_is_ignored(llm):
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = {"prompt_token_ids": _ids(8, 4)}
    full = llm.generate(prompt, base)[0].outputs[0]
    stop = full.text[1:3]
    out = llm.generate(prompt, base.model_copy(update={"stop": [stop], "min_tokens": 16}))[0].outputs[0]
    assert out.token_ids == full.token_ids and out.text == full.text and out.finish_reason == "length"


def test_interactive_admission_counts_preemptible_bulk(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4)
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        eng.add_request(f"bulk{i}", _ids(10, i), p, priority=1)
    eng.step()
    assert eng.admission_capacity(1) == 0  # full of bulk work: more bulk waits in the queue
    assert eng.admission_capacity(0) == 4  # interactive work may take the bulk sequences' places
    eng.add_request("inter", _ids(10, 9), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), priority=0)
    first_token_step = None
    for step in range(1, 10):
        for d in eng.step():
            if d.request_id == "inter" and d.new_token_ids and first_token_step is None:
                first_token_step = step
    assert first_token_step == 1  # a bulk sequence was preempted at once
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.scheduler.num_preemptions >= 1 and eng.block_manager.num_used_blocks == 0


def test_launch_collect_with_adds_and_aborts_in_flight_matches_plain_steps(tiny_llama):
    """The worker adds and aborts requests between launch() and collect(): outputs must equal step()'s."""
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def drive(split: bool) -> dict[str, list[int]]:
        eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=40, max_num_seqs=4)
        for i in range(3):
            eng.add_request(f"a{i}", _ids(9 + i, i), p)
        tokens: dict[str, list[int]] = {}
        finish: dict[str, str] = {}
        step = 0
        while eng.has_unfinished_requests() or step < 3:
            step += 1
            if split:
                inflight = eng.launch()
                with pytest.raises(RuntimeError, match="in flight"):
                    eng.launch()
            # What the worker does while the device computes: new jobs, a cancel.
            if step == 2:
                eng.add_request("late", _ids(15, 7), p)
            if step == 4:
                eng.abort("a1")
            deltas = eng.collect(inflight) if split else eng.step()
            for d in deltas:
                tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
                if d.finished:
                    finish[d.request_id] = d.finish_reason
            eng.block_manager.check_invariants()
        assert eng.block_manager.num_used_blocks == 0 and not eng.requests
        assert finish["a1"] == "abort" and finish["late"] == "length"
        return tokens

    split, plain = drive(True), drive(False)
    assert split["late"] == plain["late"] and len(split["late"]) == 12
    assert split["a0"] == plain["a0"] and split["a2"] == plain["a2"]
    # The abort made while step 4 was in flight drops that step's token: a1 has 3 tokens either way.
    assert split["a1"] == plain["a1"] and len(plain["a1"]) == 3


def _capacity_by_scan(eng, priority: int) -> int:
    """admission_capacity's definition, by plain scans of both queues."""
    sched, bm = eng.scheduler, eng.block_manager
    yielding = [s for s in sched.running if s.priority > priority]
    ahead = [s for s in sched.waiting if s.priority <= priority]
    reserved = priority > 0  # work of priority > 0 leaves the priority-0 reserve
    slots = eng.config.max_num_seqs - (len(sched.running) - len(yielding) + len(ahead)) - reserved * sched.reserved_seqs
    if slots <= 0:
        return 0
    need = sum(-(-s.num_tokens // eng.config.block_size) for s in ahead)
    free = bm.num_free_blocks + sum(len(bm.block_table(s.seq_id)) for s in yielding) - reserved * sched.reserved_blocks
    return slots if need < free else 0


def test_admission_capacity_matches_its_definition_under_random_load(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=30, max_num_seqs=5)
    rng = random.Random(1)
    for step in range(80):
        if rng.random() < 0.5:
            eng.add_request(f"r{step}", _ids(rng.randrange(1, 40), step),
                            SamplingParams(temperature=0, max_tokens=rng.randrange(1, 25), ignore_eos=True),
                            priority=rng.choice([0, 1, 1, 2]))
        for p in (0, 1, 2):
            assert eng.admission_capacity(p) == _capacity_by_scan(eng, p), (step, p)
        eng.step()


@pytest.mark.parametrize("num_blocks", [None, 12], ids=["roomy", "tight-cache"])
def test_isolated_request_runs_alone_and_matches_a_normal_run(tiny_llama, num_blocks):
    """isolated=True (the worker's quarantine): while it is unfinished every step holds its sequences only;
    the others keep their place (or are preempted for room) and all outputs equal an un-isolated run."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    two = SamplingParams(temperature=0.9, seed=7, n=2, max_tokens=10, ignore_eos=True)

    def run(isolate: bool):
        eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4,
                                    num_kv_blocks=num_blocks)
        steps, done = [], {}
        for i in range(4):
            eng.add_request(f"bg{i}", f"background job {i}", params)
        eng.step()
        eng.add_request("suspect", "a suspicious prompt", two, isolated=isolate)
        original = eng.scheduler.schedule

        def recording():
            out = original()
            steps.append({c.seq_id.split("#")[0] for c in out.chunks})
            return out

        eng.scheduler.schedule = recording
        while eng.has_unfinished_requests():
            for d in eng.step():
                done.setdefault((d.request_id, d.index), []).extend(d.new_token_ids)
        return steps, done

    steps, isolated_out = run(True)
    _, normal_out = run(False)
    assert isolated_out == normal_out
    first = next(i for i, s in enumerate(steps) if "suspect" in s)
    last = max(i for i, s in enumerate(steps) if "suspect" in s)
    assert all(s == {"suspect"} for s in steps[first:last + 1] if s), steps
    assert any(s - {"suspect"} for s in steps[last + 1:])  # the others went on afterwards


# ---- logit_bias, top_p = 0, any-integer seeds, max_tokens = None ----

def test_logit_bias_steers_greedy_and_out_of_vocab_ids_are_refused(llm):
    prompt = {"prompt_token_ids": _ids(6, 11)}
    base = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = llm.generate(prompt, base)[0].outputs[0].token_ids
    forced = llm.generate(prompt, base.model_copy(update={"logit_bias": {77: 100.0}}))[0].outputs[0].token_ids
    assert forced == [77] * 6
    banned = llm.generate(prompt, base.model_copy(update={"logit_bias": {plain[0]: -100.0}}))[0].outputs[0]
    assert banned.token_ids[0] != plain[0]
    with pytest.raises(ValueError, match="logit_bias token id 512 "):
        llm.engine.add_request("bias-oov", prompt, SamplingParams(logit_bias={3: 1.0, 512: 5.0}))
    assert "bias-oov" not in llm.engine.requests
    assert SamplingParams(logit_bias={"12": 1}).logit_bias == {12: 1.0}  # JSON object keys are strings


def test_top_p_zero_equals_temperature_zero(llm):
    prompt = {"prompt_token_ids": _ids(7, 12)}
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    top_p0 = llm.generate(prompt, SamplingParams(top_p=0, temperature=1.3, seed=5, max_tokens=8, ignore_eos=True))[0]
    assert top_p0.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_negative_and_huge_seeds_are_reproducible(llm):
    prompt = {"prompt_token_ids": _ids(6, 13)}

    def run(seed, n=1):
        p = SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=10, ignore_eos=True)
        return [c.token_ids for c in llm.generate(prompt, p)[0].outputs]

    neg = run(-7, n=2)
    assert run(-7, n=2) == neg and neg[0] != neg[1]
    assert run(-8) != neg[:1]
    assert run(2**64 - 7) == neg[:1] and run(2**200 - 6) == neg[1:]  # seed mod 2**64, child i at seed + i


def test_max_tokens_none_fills_the_context(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", block_size=8, max_model_len=64)
    p = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": _ids(10, 14)}, p)[0].outputs[0]
    assert len(out.token_ids) == 54 and out.finish_reason == "length"
    full = llm.generate({"prompt_token_ids": _ids(64, 15)}, p)[0]
    assert full.outputs[0].finish_reason == "error" and "no room" in full.error
    small = LLM(str(tiny_llama), device="cpu", block_size=8, max_model_len=64, num_kv_blocks=4)  # 32 tokens
    out = small.generate({"prompt_token_ids": _ids(10, 14)}, p)[0].outputs[0]
    assert len(out.token_ids) == 22 and out.finish_reason == "length"
    too_many = SamplingParams(temperature=0, max_tokens=None, min_tokens=30, ignore_eos=True)
    assert small.generate({"prompt_token_ids": _ids(10, 14)}, too_many)[0].outputs[0].finish_reason == "error"
