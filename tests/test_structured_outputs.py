"""Structured outputs: a random-weight model still produces valid JSON / regex / choice / EBNF output under the
grammar mask, with n > 1, seeds, stops, min_tokens, penalties, chunked prefill, prefix caching and preemption;
invalid specs fail their request only; compiles are cached and never block other requests' steps."""
from __future__ import annotations

import json
import random
import re
import threading
import time

import pytest
import torch
import xgrammar as xgr

import spool.engine.grammar_compiler as grammar_compiler
from spool.engine import LLM, LLMEngine, SamplingParams, StructuredOutputsParams as SO
from spool.engine.config import ConfigError
from spool.engine.grammar_compiler import GrammarCache
from spool.engine.sampler import Sampler, SamplingRow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "[A-Z][a-z]{0,7}"},  # random weights would write free text forever
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"}},
                "required": ["kind", "ok"]},
    },
    "required": ["name", "age", "tags", "pet"],
}
# Finite: every value is from a small set, so the closing brace comes within a few tokens and then only EOS.
FINITE = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                   "size": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["ok", "color", "size"],
}
REGEX = r"[a-z]{2,6}-\d{2,4}(\.(com|org))?"
CHOICES = ["yes", "no", 'say "hi"', "café ☕", "no way"]
EBNF = 'root ::= "[" item ("," item){0,3} "]"\nitem ::= [0-9]{1,3} | "x"'
EBNF_RE = r"\[(\d{1,3}|x)(,(\d{1,3}|x)){0,3}\]"


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def check_schema(value, schema: dict, path: str = "$") -> None:
    """A hand-written JSON Schema check for the keywords these tests use (jsonschema is not installed)."""
    if "enum" in schema:
        assert value in schema["enum"], path
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), path
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(value), path
        assert set(value) <= set(props), path  # xgrammar's strict mode: no unlisted properties
        for k, v in value.items():
            check_schema(v, props[k], f"{path}.{k}")
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value)), path
        for i, v in enumerate(value):
            check_schema(v, schema.get("items", {}), f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), path
        assert re.fullmatch(schema.get("pattern", ".*"), value, re.DOTALL), path
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), path
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), path
    elif kind == "boolean":
        assert isinstance(value, bool), path


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=16)


def _sp(spec: SO, **kw) -> SamplingParams:
    kw.setdefault("temperature", 1.0)
    kw.setdefault("max_tokens", 80)
    return SamplingParams(structured_outputs=spec, **kw)


def test_json_schema_outputs_validate(llm):
    outs = llm.generate([{"prompt_token_ids": _ids(6, s)} for s in range(4)],
                        [_sp(SO(json=PERSON), n=2, seed=s, max_tokens=120) for s in range(4)])
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            check_schema(json.loads(c.text), PERSON)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 3.0])
def test_finite_schema_stops_with_eos(llm, tiny_tokenizer, temperature):
    outs = llm.generate({"prompt_token_ids": _ids(5, 1)},
                        _sp(SO(json=json.dumps(FINITE)), n=4, seed=5, temperature=temperature))
    for c in outs[0].outputs:
        assert c.finish_reason == "stop" and c.stop_reason is None, c
        assert c.token_ids[-1] == tiny_tokenizer.eos_token_id
        check_schema(json.loads(c.text), FINITE)
        assert c.text == json.dumps(json.loads(c.text))  # compact layout: ", " and ": ", nothing else


def test_regex_choice_grammar_and_json_object(llm):
    specs = [SO(regex=REGEX), SO(choice=CHOICES), SO(grammar=EBNF), SO(json_object=True)]
    outs = llm.generate([{"prompt_token_ids": _ids(7, i)} for i in range(len(specs))],
                        [_sp(s, n=3, seed=9, max_tokens=60) for s in specs])
    regex, choice, grammar, obj = ([c for c in o.outputs] for o in outs)
    for c in regex:
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text), c.text
    for c in choice:
        assert c.finish_reason == "stop" and c.text in CHOICES, c.text
    for c in grammar:
        assert c.finish_reason == "stop" and re.fullmatch(EBNF_RE, c.text), c.text
    for c in obj:
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)


def test_n_and_seeds_reproducible_and_batch_invariant(llm):
    p = _sp(SO(json=FINITE), n=3, seed=1234, temperature=1.5)
    prompt = {"prompt_token_ids": _ids(9, 3)}
    alone = [c.token_ids for c in llm.generate(prompt, p)[0].outputs]
    others = [{"prompt_token_ids": _ids(5 + i, 20 + i)} for i in range(3)]
    other_params = [SamplingParams(temperature=0.8, max_tokens=7), _sp(SO(regex=REGEX), seed=3),
                    _sp(SO(choice=CHOICES))]
    batched = llm.generate(others[:2] + [prompt] + others[2:], other_params[:2] + [p] + other_params[2:])
    assert [c.token_ids for c in batched[2].outputs] == alone
    assert [c.token_ids for c in llm.generate(prompt, p)[0].outputs] == alone
    assert len({tuple(t) for t in alone}) > 1  # one matcher per completion: they diverge


def _replay_ok(cache: GrammarCache, spec: SO, token_ids: list[int], eos: int) -> bool:
    """Every token is accepted by a fresh matcher replaying the sequence; a final EOS terminates it."""
    m = cache.matcher(cache.get(spec).result())
    for t in token_ids:
        if not m.accept(t):
            return False
    return m.terminated or not token_ids or token_ids[-1] != eos


def test_random_steps_never_sample_a_disallowed_token(tiny_llama, tiny_tokenizer):
    """Random specs, temperatures, penalties, logit biases (pushing toward arbitrary tokens), n, min_tokens,
    chunk sizes: every completion replays through a fresh matcher."""
    eos = tiny_tokenizer.eos_token_id
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=6,
                                max_num_batched_tokens=32, num_kv_blocks=40)
    cache = GrammarCache(eng.tokenizer, eng.model_cfg.vocab_size, [eos])
    specs = [SO(json=PERSON), SO(json=FINITE), SO(regex=REGEX), SO(choice=CHOICES), SO(grammar=EBNF),
             SO(json_object=True)]
    rng = random.Random(0)
    reqs, done = {}, {}
    for i in range(18):
        spec = rng.choice(specs)
        bias = {rng.randrange(512): rng.uniform(-100, 100) for _ in range(rng.randrange(4))}
        p = _sp(spec, n=rng.choice([1, 2]), seed=rng.choice([None, rng.randrange(-2**70, 2**70)]),
                temperature=rng.choice([0.0, 0.7, 1.0, 5.0]), top_k=rng.choice([0, 5]),
                top_p=rng.choice([1.0, 0.9]), repetition_penalty=rng.choice([1.0, 1.3]),
                frequency_penalty=rng.choice([0.0, 1.0]), min_tokens=rng.choice([0, 3]), logit_bias=bias,
                max_tokens=rng.randrange(10, 50))
        eng.add_request(f"r{i}", _ids(rng.randrange(1, 40), i), p)
        reqs[f"r{i}"] = spec
        for d in eng.step():
            done.setdefault((d.request_id, d.index), []).extend(d.new_token_ids)
    while eng.has_unfinished_requests():
        for d in eng.step():
            done.setdefault((d.request_id, d.index), []).extend(d.new_token_ids)
            assert d.finish_reason != "error", d.error
    assert len(done) > 18
    for (rid, _), tokens in done.items():
        assert _replay_ok(cache, reqs[rid], tokens, eos), (rid, reqs[rid].kind, tokens)


def test_length_limited_strings_keep_control_characters_out(tiny_tokenizer):
    """xgrammar 0.2.9 lets raw control characters into strings with minLength/maxLength (invalid JSON); the
    compile patches that character class to plain strings' (spool/engine/grammar_compiler.py)."""
    cache = GrammarCache(tiny_tokenizer, 512, [tiny_tokenizer.eos_token_id])
    schema = {"type": "object", "required": ["a", "b"],
              "properties": {"a": {"type": "string", "minLength": 1, "maxLength": 5}, "b": {"type": "string"}}}
    compiled = cache.get(SO(json=schema)).result()
    for text, ok in [('{"a": "xy", "b": "z\\n"}', True), ('{"a": "x\ty", "b": "z"}', False),
                     ('{"a": "x\x01", "b": "z"}', False), ('{"a": "xyzxyz", "b": "z"}', False),
                     ('{"a": "", "b": "z"}', False), ('{"a": "xy", "b": "z\tw"}', False)]:
        assert cache.matcher(compiled).matcher.accept_string(text) is ok, text


def test_sampler_with_real_matchers_respects_the_mask(tiny_tokenizer):
    """The sampler alone, on random logits (any token may win): the sampled token is always accepted."""
    vocab, eos = 512, tiny_tokenizer.eos_token_id
    cache = GrammarCache(tiny_tokenizer, vocab, [eos])
    sampler = Sampler(vocab, "cpu")
    specs = [SO(json=PERSON), SO(regex=REGEX), SO(grammar=EBNF)]
    grammars = [cache.matcher(cache.get(s).result()) for s in specs]
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        live = [i for i, g in enumerate(grammars) if not g.terminated]
        if not live:
            break
        rows = [SamplingRow(SamplingParams(temperature=[0.0, 1.0, 4.0][step % 3], top_k=[0, 3][step % 2]),
                            [1], [], step, [eos], f"k{i}", grammars[i]) for i in live]
        rows.insert(1, SamplingRow(SamplingParams(temperature=1.0), [1], [], None, [eos], "free"))  # no grammar
        logits = torch.randn(len(rows), vocab, generator=gen) * 10
        tokens = sampler(logits, rows).token_ids
        for r, t in zip(rows, tokens):
            if r.grammar is not None:
                assert r.grammar.accept(t), (step, t)


def test_invalid_specs_fail_their_request_only(llm):
    bad = [SO(json={"type": "nonsense"}), SO(regex="(unclosed"), SO(grammar="root ::= undefined_rule"),
           SO(json={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})]
    ok = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": _ids(5, i)} for i in range(5)], [_sp(s, n=2) for s in bad] + [ok])
    for o in outs[:4]:
        assert o.finished and o.error.startswith("invalid_structured_output: "), o.error
        assert [c.finish_reason for c in o.outputs] == ["error", "error"]
        assert all(c.token_ids == [] for c in o.outputs)
        assert "/project/" not in o.error  # xgrammar's source location is cut off
    assert outs[4].outputs[0].finish_reason == "length" and len(outs[4].outputs[0].token_ids) == 5
    # A failed spec is remembered: asking again fails at once (next step), the engine keeps serving.
    again = llm.generate([{"prompt_token_ids": _ids(5, 1)}] * 2, [_sp(bad[1]), ok])
    assert again[0].outputs[0].finish_reason == "error" and again[1].outputs[0].finish_reason == "length"


def test_invalid_spec_error_delta(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
    eng.add_request("bad", _ids(4, 0), _sp(SO(regex="[z-a]")))
    deltas = []
    while eng.has_unfinished_requests():
        deltas += eng.step()
    assert len(deltas) == 1 and deltas[0].finished and deltas[0].finish_reason == "error"
    assert deltas[0].error.startswith("invalid_structured_output: ") and not eng.requests


def test_compile_cache_same_spec_compiles_once(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
    as_dict, as_text = SO(json=FINITE), SO(json=json.dumps(FINITE, indent=2))
    eng.add_request("a", _ids(5, 0), _sp(as_dict))
    while eng.has_unfinished_requests():
        eng.step()
    cache = eng._grammars.cache
    assert cache.num_compiles == 1
    eng.add_request("b", _ids(5, 1), _sp(as_text, n=2))  # the same schema spelled differently: a hit
    assert cache.num_compiles == 1 and len(eng._grammars) == 0  # ready at once: never waited for a compile
    assert {s.seq_id for s in eng.scheduler.waiting} == {"b#0", "b#1"}
    reordered = dict(FINITE, properties=dict(reversed(list(FINITE["properties"].items()))))
    eng.add_request("c", _ids(5, 2), _sp(SO(json=reordered)))  # property order is output order: a new grammar
    assert cache.num_compiles == 2
    while eng.has_unfinished_requests():
        eng.step()


def test_slow_compile_does_not_block_other_requests(tiny_llama, monkeypatch):
    release = threading.Event()
    real = grammar_compiler.compile_spec

    def slow(compiler, kind, source):
        assert release.wait(30)
        return real(compiler, kind, source)

    monkeypatch.setattr(grammar_compiler, "compile_spec", slow)
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
    eng.add_request("slow", _ids(6, 0), _sp(SO(json=FINITE), temperature=0))
    eng.add_request("fast", _ids(6, 1), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    tokens: dict[str, list[int]] = {"slow": [], "fast": []}
    finish = {}
    for _ in range(12):
        for d in eng.step():
            tokens[d.request_id] += d.new_token_ids
            if d.finished:
                finish[d.request_id] = d.finish_reason
    assert finish == {"fast": "length"} and len(tokens["fast"]) == 10
    assert tokens["slow"] == [] and len(eng._grammars) == 1 and eng.has_unfinished_requests()
    assert eng.admission_capacity(0) == eng.scheduler.admission_capacity(0) - 1  # it counts as queued
    release.set()
    while eng.has_unfinished_requests():
        for d in eng.step():
            tokens[d.request_id] += d.new_token_ids
            if d.finished:
                finish[d.request_id] = d.finish_reason
    assert finish["slow"] == "stop"


def test_a_compile_past_the_timeout_fails_its_request_and_later_ones_at_once(tiny_llama, monkeypatch):
    release = threading.Event()
    real = grammar_compiler.compile_spec
    monkeypatch.setattr(grammar_compiler, "compile_spec", lambda *a: (release.wait(30), real(*a))[1])
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, grammar_compile_timeout_s=0.3)
    eng.add_request("stuck", _ids(6, 0), _sp(SO(json=FINITE)))
    eng.add_request("plain", _ids(6, 1), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    start, final = time.monotonic(), {}
    while "stuck" not in final:
        assert time.monotonic() - start < 20
        final.update({d.request_id: d for d in eng.step() if d.finished})
    assert time.monotonic() - start >= 0.3
    assert final["stuck"].finish_reason == "error"
    assert final["stuck"].error == "invalid_structured_output: the grammar did not compile within 0.3 s"
    eng.add_request("again", _ids(6, 2), _sp(SO(json=FINITE)))  # the same spec: no second wait
    again = {d.request_id: d for d in eng.step() if d.finished}["again"]
    assert again.error == final["stuck"].error
    release.set()
    while eng.has_unfinished_requests():
        final.update({d.request_id: d for d in eng.step() if d.finished})
    assert final["plain"].finish_reason == "length"
    with pytest.raises(ConfigError, match="grammar_compile_timeout_s"):
        LLMEngine.from_kwargs(str(tiny_llama), device="cpu", grammar_compile_timeout_s=0)


def test_abort_while_compiling(tiny_llama, monkeypatch):
    release = threading.Event()
    real = grammar_compiler.compile_spec
    monkeypatch.setattr(grammar_compiler, "compile_spec", lambda *a: (release.wait(30), real(*a))[1])
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
    eng.add_request("x", _ids(6, 0), _sp(SO(regex="abc+"), n=2))
    assert eng.abort("x")
    deltas = eng.step()
    assert sorted((d.index, d.finish_reason) for d in deltas) == [(0, "abort"), (1, "abort")]
    assert not eng.has_unfinished_requests() and not eng.requests
    release.set()


def test_preemption_keeps_the_matcher_in_step(tiny_llama):
    """A tiny KV cache forces preemption (recompute): outputs equal a roomy run and stay valid."""
    specs = [SO(json=PERSON), SO(regex=REGEX), SO(grammar=EBNF), SO(json=FINITE)]
    params = [_sp(s, temperature=0.0, max_tokens=40) for s in specs]
    params += [_sp(s, seed=i, max_tokens=40) for i, s in enumerate(specs)]
    prompts = [{"prompt_token_ids": _ids(20, i)} for i in range(len(params))]

    def run(num_blocks):
        llm = LLM(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=num_blocks, max_num_seqs=8)
        outs = llm.generate(prompts, params)
        return [o.outputs[0].token_ids for o in outs], llm.engine.scheduler.num_preemptions

    tight, preemptions = run(12)
    roomy, none = run(None)
    assert preemptions > 0 and none == 0
    assert tight == roomy


def test_chunked_prefill_and_prefix_cache_do_not_change_output(tiny_llama):
    prompt = {"prompt_token_ids": _ids(70, 3)}
    p = _sp(SO(json=PERSON), temperature=0.0, max_tokens=40)
    big = LLM(str(tiny_llama), device="cpu", block_size=8).generate(prompt, p)[0].outputs[0].token_ids
    small = LLM(str(tiny_llama), device="cpu", block_size=8, max_num_batched_tokens=16)
    first = small.generate([prompt, prompt], p)  # chunked; the second shares the first's blocks once cached
    second = small.generate(prompt, p)[0].outputs[0].token_ids  # a prefix-cache hit
    assert [o.outputs[0].token_ids for o in first] == [big, big] and second == big


def test_stop_strings_cut_text_and_stop_ids(llm):
    spec = SO(grammar='root ::= "hello world, bye"')
    out = llm.generate({"prompt_token_ids": _ids(5, 0)}, _sp(spec, stop=["world"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "world" and out.text == "hello "
    full = llm.generate({"prompt_token_ids": _ids(5, 0)}, _sp(spec))[0].outputs[0]
    assert full.text == "hello world, bye" and full.finish_reason == "stop"


def test_min_tokens_with_grammar(llm, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    # The grammar can go on: EOS waits for min_tokens.
    p = _sp(SO(regex="[a-z]+"), n=3, seed=2, min_tokens=8, max_tokens=30)
    for c in llm.generate({"prompt_token_ids": _ids(5, 0)}, p)[0].outputs:
        assert re.fullmatch("[a-z]+", c.text) and eos not in c.token_ids[:8]
    # The grammar can only end: EOS is allowed anyway (an invalid token would be worse); the output ends early.
    p = _sp(SO(choice=["ok"]), min_tokens=10)
    c = llm.generate({"prompt_token_ids": _ids(5, 0)}, p)[0].outputs[0]
    assert c.text == "ok" and c.finish_reason == "stop" and c.token_ids[-1] == eos and len(c.token_ids) < 10


def test_ignore_eos_with_grammar_stops_when_the_grammar_terminates(llm, tiny_tokenizer):
    c = llm.generate({"prompt_token_ids": _ids(5, 0)}, _sp(SO(json=FINITE), ignore_eos=True))[0].outputs[0]
    assert c.finish_reason == "stop" and c.token_ids[-1] == tiny_tokenizer.eos_token_id
    check_schema(json.loads(c.text), FINITE)


def test_logit_bias_cannot_override_the_grammar(llm, tiny_tokenizer):
    banned = tiny_tokenizer.encode("z", add_special_tokens=False)
    p = _sp(SO(choice=["yes", "no"]), n=4, seed=0, logit_bias={banned[0]: 100.0})
    for c in llm.generate({"prompt_token_ids": _ids(5, 0)}, p)[0].outputs:
        assert c.text in ("yes", "no")


def test_penalties_with_grammar(llm):
    p = _sp(SO(json=PERSON), n=3, seed=4, repetition_penalty=2.0, frequency_penalty=1.5, presence_penalty=1.0,
            max_tokens=120)
    for c in llm.generate({"prompt_token_ids": _ids(8, 0)}, p)[0].outputs:
        if c.finish_reason == "stop":
            check_schema(json.loads(c.text), PERSON)


def test_rejected_token_finishes_with_error(tiny_llama, monkeypatch):
    """Defensive path: a token the matcher rejects (the mask should make it impossible) ends that sequence."""
    from spool.engine.grammar import SequenceGrammar

    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
    eng.add_request("ok", _ids(5, 1), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    eng.add_request("x", _ids(5, 0), _sp(SO(regex="[a-z]+")))
    reject = lambda g, t: setattr(g, "error", f"no {t}") or False  # noqa: E731
    monkeypatch.setattr(SequenceGrammar, "accept", reject)
    monkeypatch.setattr(SequenceGrammar, "accept_many", staticmethod(lambda gs, ts: list(map(reject, gs, ts))))
    final = {}
    while eng.has_unfinished_requests():
        final.update({d.request_id: d for d in eng.step() if d.finished})
    assert final["x"].finish_reason == "error" and final["x"].error.startswith("structured output: no ")
    assert final["ok"].finish_reason == "length"


def test_no_tokenizer_means_invalid(tiny_llama):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
    eng._grammars.tokenizer = None  # as with load_format="dummy" and no tokenizer files
    eng.add_request("x", _ids(5, 0), _sp(SO(regex="a")))
    (d,) = eng.step()
    assert d.finish_reason == "error"
    assert d.error == "invalid_structured_output: structured outputs need the model's tokenizer"


def test_spec_validation_and_cache_key():
    assert SO(json='{"type": "object"}').json == '{"type": "object"}' and SO(json={"a": 1}).kind == "json"
    assert SO(json={"type": "object"}).cache_key() == SO(json_object=True).cache_key()
    assert SO(choice=["a"]).cache_key() == SO(grammar='root ::= "a"').cache_key()
    assert SO(json={"b": 1, "a": 2}).cache_key() != SO(json={"a": 2, "b": 1}).cache_key()
    p = SamplingParams(structured_outputs={"json": {"type": "object"}})
    assert p.structured_outputs.kind == "json"
    assert xgr.GrammarMatcher is not None  # xgrammar is the compiler (and importable)


def test_fill_many_equals_row_by_row_on_both_thread_paths():
    """SequenceGrammar.fill_many (xgrammar's batch fill, threaded for big masks) sets the same bits."""
    from spool.engine.grammar import SequenceGrammar
    from spool.engine.token_bitmask import bitmask_words

    rng = random.Random(0)
    chars = "abcdefghij0123456789 \"{}[]:,-"
    vocab = ["<eos>"] + sorted({"".join(rng.choice(chars) for _ in range(rng.randint(1, 6))) for _ in range(40_000)})
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[0])
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(FINITE, any_whitespace=False)
    prefixes = ["", '{"ok": ', '{"ok": true, "color": "gr', '{"ok": false, "color": "red", "size": ']
    for rows in (3, 40):  # 40 x ~30k ids crosses the threaded threshold
        grammars = [SequenceGrammar(xgr.GrammarMatcher(compiled)) for _ in range(rows)]
        for i, g in enumerate(grammars):
            assert g.matcher.accept_string(prefixes[i % len(prefixes)])
        assert (rows * len(vocab) >= SequenceGrammar._THREADED_FROM) == (rows == 40)
        many = torch.full((rows, bitmask_words(len(vocab))), -1, dtype=torch.int32)
        one = many.clone()
        SequenceGrammar.fill_many(grammars, many)
        for j, g in enumerate(grammars):
            g.fill_bitmask(one, j)
        assert torch.equal(many, one)
