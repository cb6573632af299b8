"""Wire protocol v1 without Redis: key layout, Job validation and error codes, Result/TokenEvent round trips."""
from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from spool.protocol import schema_export
from spool.protocol.defaults import Defaults
from spool.protocol.keys import Keys, new_id, validate_id
from spool.protocol import (
    DEFAULT_LIMITS, SAMPLING_FIELDS, Choice, Job, JobError, Limits, Result, TokenEvent, TokenLogprob,
    parse_entry, parse_job,
)

ROOT = Path(__file__).resolve().parent.parent


def err(raw, limits: Limits = DEFAULT_LIMITS) -> JobError:
    """The JobError that parsing `raw` (bytes as is, anything else JSON-encoded first) raises."""
    with pytest.raises(JobError) as info:
        parse_job(raw if isinstance(raw, bytes) else orjson.dumps(raw), limits)
    return info.value


# --- keys ---------------------------------------------------------------------------------------------

def test_key_layout():
    k = Keys()
    assert k.jobs() == k.jobs("interactive") == "spool:jobs"
    assert k.jobs("bulk") == "spool:jobs:bulk"
    assert k.all_jobs == ["spool:jobs", "spool:jobs:bulk"]
    assert (k.result("a"), k.tokens("a"), k.status("a"), k.cancel("a")) == (
        "spool:result:{a}", "spool:tokens:{a}", "spool:status:{a}", "spool:cancel:{a}")
    assert (k.cancels, k.dead, k.workers, k.worker("gpu-0"), k.batch("b1")) == (
        "spool:cancels", "spool:dead", "spool:workers", "spool:worker:{gpu-0}", "spool:batch:{b1}")
    assert k.group == "workers"
    assert Keys("t1:").result("x") == "t1:result:{x}"
    assert k.priority_of(b"spool:jobs:bulk") == "bulk"
    assert Keys.default_id("interactive", b"1718-0") == "1718-0"
    assert Keys.default_id("bulk", "1718-0") == "bulk-1718-0"


@pytest.mark.parametrize("bad", ["", "a:b", "a*", "a b", "a\nb", "é", "x" * 129, None, 7])
def test_invalid_ids_are_rejected_everywhere(bad):
    with pytest.raises(ValueError, match="id"):
        validate_id(bad)
    with pytest.raises(ValueError):
        Keys().result(bad)


def test_valid_ids():
    for good in ["a", "A.b_c-9", "x" * 128, new_id()]:
        assert validate_id(good) == good
    assert re.fullmatch(r"[0-9a-f]{32}", new_id())
    with pytest.raises(ValueError):
        Keys("bad prefix ")
    with pytest.raises(ValueError):
        Keys().jobs("urgent")


# --- jobs: valid documents ----------------------------------------------------------------------------

def test_canonical_example_in_protocol_doc_is_valid():
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text()
    m = re.search(r"redis-cli (?:-c )?XADD spool:jobs '\*' job '(\{.*?\})'", doc)
    assert m, "docs/PROTOCOL.md lost its canonical example"
    job = parse_job(m.group(1))
    assert (job.id, job.prompt, job.max_tokens, job.stream) == ("hello-1", "Once upon a time", 16, False)


def test_defaults_follow_vllm():
    job = parse_job(b'{"prompt":"hi"}')
    # max_tokens null: the rest of the context, as OpenAI and vLLM's server (the worker resolves it)
    assert job.sampling_kwargs() == {
        "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "max_tokens": None,
        "min_tokens": 0, "stop": [], "stop_token_ids": [], "ignore_eos": False, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logprobs": None,
        "include_stop_str_in_output": False, "skip_special_tokens": True}
    assert (job.id, job.v, job.priority, job.deadline, job.metadata) == (None, None, None, None, None)


def test_each_prompt_kind_and_passthrough():
    meta = {"trace": {"ids": [1, 2.5, None, True], "s": "é\u2028"}, "n": -3}
    job = parse_job(orjson.dumps({"v": 2, "id": "m", "messages": [{"role": "system", "content": ""},
                                                                  {"role": "user", "content": "hi"}],
                                  "stop": "\n", "metadata": meta, "deadline": 1.7e9, "priority": "bulk"}))
    assert job.messages[1].content == "hi" and job.stop == ["\n"] and job.metadata == meta
    assert parse_job(b'{"prompt_token_ids":[0,1,2],"temperature":0}').prompt_token_ids == [0, 1, 2]


def test_valid_job_always_yields_valid_engine_sampling_params():
    sp = pytest.importorskip("spool.engine.sampling_params")
    # logit_bias is converted (string keys -> ids) and structured_outputs built by the worker (spool/worker/chat.py)
    assert set(SAMPLING_FIELDS) | {"logit_bias", "structured_outputs"} == set(sp.SamplingParams.model_fields), \
        "Job and SamplingParams drifted apart"
    extremes = [
        dict(temperature=100.0, top_p=1e-9, top_k=-1, min_p=1.0, seed=2**63 - 1, n=16, logprobs=20),
        dict(top_p=0.0, seed=-(2**63), logit_bias={"0": -100.0, "7": 100.0}),
        dict(seed=2**64 - 1),
        dict(temperature=0.0, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=10.0),
        dict(max_tokens=8192, min_tokens=8192, stop=["x" * 256] * 16, stop_token_ids=list(range(16))),
        dict(stop="a", ignore_eos=True, include_stop_str_in_output=True, skip_special_tokens=False, logprobs=0),
    ]
    for kw in extremes:
        job = parse_job(orjson.dumps({"prompt": "p", **kw}))
        sp.SamplingParams(**job.sampling_kwargs())
    hard = Limits(max_n=sp.MAX_N, max_stop=sp.MAX_STOP_STRINGS)  # the schema's own bounds, not the policy's
    job = parse_job(orjson.dumps({"prompt": "p", "n": sp.MAX_N, "stop": ["s"] * sp.MAX_STOP_STRINGS}), hard)
    sp.SamplingParams(**job.sampling_kwargs())


# --- jobs: each kind of bad input -> its error code -----------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"prompt": NaN}', b'{"prompt":"a","top_p":Infinity}',
                                 b'{"prompt":"a","temperature":1e400}', b"\xff\xfe"])
def test_invalid_json(raw):
    assert err(raw).code == "invalid_json"


@pytest.mark.parametrize("raw", [b'{"prompt":"a","seed":-9223372036854775809}',
                                 b'{"prompt":"a","seed":18446744073709551616}'])
def test_seed_outside_64_bits_is_refused(raw):
    assert err(raw).code in ("invalid_json", "invalid_job")  # JSON parsers disagree on such numbers


@pytest.mark.parametrize("doc", [
    [1, 2], "a string", 3,                                       # not an object
    {}, {"max_tokens": 3},                                       # no prompt field
    {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},  # two prompt fields
    {"prompt": "a", "prompt_token_ids": [1]}, {"prompt": ""}, {"messages": []}, {"prompt_token_ids": []},
    {"prompt": "a", "bogus": 1}, {"prompt": "a", "Max_tokens": 3},   # unknown fields
    {"prompt": "a", "max_tokens": "16"}, {"prompt": "a", "max_tokens": 16.0}, {"prompt": "a", "stream": 1},
    {"prompt": "a", "n": True}, {"prompt": 5},                    # wrong types (strict: no coercion)
    {"prompt": "a", "temperature": -0.1}, {"prompt": "a", "temperature": 100.5}, {"prompt": "a", "top_p": -0.1},
    {"prompt": "a", "top_k": -2}, {"prompt": "a", "min_p": 1.5}, {"prompt": "a", "seed": 1.5},
    {"prompt": "a", "max_tokens": 0}, {"prompt": "a", "min_tokens": -1},
    {"prompt": "a", "max_tokens": 4, "min_tokens": 5}, {"prompt": "a", "repetition_penalty": 0},
    {"prompt": "a", "presence_penalty": 2.5}, {"prompt": "a", "logprobs": 21}, {"prompt": "a", "n": 0},
    {"prompt": "a", "stop": ""}, {"prompt": "a", "stop": ["ok", ""]}, {"prompt": "a", "stop": "x" * 257},
    {"prompt": "a", "stop_token_ids": [-1]}, {"prompt_token_ids": [1, -2]}, {"prompt_token_ids": [2**31]},
    {"messages": [{"role": "robot", "content": "x"}]}, {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
    {"prompt": "a", "priority": "urgent"}, {"prompt": "a", "deadline": 0}, {"prompt": "a", "metadata": [1]},
    {"prompt": "a", "v": True}, {"prompt": "a", "v": "1"},
    {"prompt": "a", "max_tokens": 8193}, {"prompt": "a", "n": 17}, {"prompt": "a", "stop": ["s"] * 17},
    {"prompt": "a", "stop_token_ids": list(range(17))},       # over the default Limits
])
def test_invalid_job(doc):
    e = err(doc)
    assert e.code == "invalid_job", e
    assert e.message and str(e).startswith("invalid_job: ")


def test_messages_are_clear():
    assert "exactly one of prompt, messages, prompt_token_ids" in err({"max_tokens": 3}).message
    assert "max_tokens is 9000; this deployment allows at most 8192" in err({"prompt": "a", "max_tokens": 9000}).message
    assert "bogus" in err({"prompt": "a", "bogus": 1}).message


@pytest.mark.parametrize("bad_id", ["a:b", "a*", "a b", "line\n", "", "x" * 129, 5, ["a"]])
def test_invalid_id(bad_id):
    e = err({"id": bad_id, "prompt": "a"})
    assert (e.code, e.id) == ("invalid_id", None)


def test_id_limit_and_null_id():
    assert err({"id": "abcdefghi", "prompt": "a"}, Limits(max_id=8)).code == "invalid_id"
    assert parse_job(b'{"id":null,"prompt":"a"}').id is None  # the worker then uses Keys.default_id


def test_unsupported_version():
    e = err({"id": "v3", "prompt": "a", "v": 3})
    assert (e.code, e.id) == ("unsupported_version", "v3")
    e = err({"id": "old", "prompt": "a", "v": 1})  # a v1 producer reads keys v2 no longer writes: say so
    assert e.code == "unsupported_version" and "spool:result:{ID}" in e.message


def test_non_finite_floats_rejected_from_python_too():
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError):
            Job.model_validate({"prompt": "a", "temperature": bad})
        with pytest.raises(ValueError):
            Job.model_validate({"prompt": "a", "deadline": bad})


def test_too_large():
    small = Limits(max_job_bytes=200, max_prompt_chars=10, max_prompt_tokens=3)
    e = err({"id": "big", "prompt": "a", "metadata": {"pad": "x" * 300}}, small)
    assert (e.code, e.id) == ("too_large", "big") and "200" in e.message
    assert err({"id": "p", "prompt": "x" * 11}, small).code == "too_large"
    assert err({"messages": [{"role": "user", "content": "x" * 6}] * 2}, small).code == "too_large"
    assert err({"prompt_token_ids": [1, 2, 3, 4]}, small).code == "too_large"
    assert err(b'{"id":"trunc","prompt":"' + b"x" * 300, small).id == "trunc"  # too big and broken
    parse_job(orjson.dumps({"prompt": "x" * 10}), small)
    parse_job(orjson.dumps({"prompt": "a", "max_tokens": 100_000}), Limits(max_tokens=100_000))


def test_id_recovered_only_when_safe():
    assert err({"id": "keep-me", "prompt": "a", "top_p": 2}).id == "keep-me"
    assert err(b'{"id":"first","prompt":"a",').id == "first"  # broken JSON, id is the leading key
    assert err(b'{"metadata":{"id":"other"},"prompt":').id is None  # a nested id must never be trusted
    assert err(b'{"id":"bad:id","prompt":').id is None
    assert err({"id": "has space", "prompt": "a"}).id is None


def test_parse_entry():
    assert parse_entry({b"job": b'{"prompt":"a"}'}).prompt == "a"
    assert parse_entry({"job": '{"prompt":"a"}'}).prompt == "a"
    e = pytest.raises(JobError, parse_entry, {b"prompt": b"hi"}).value
    assert e.code == "missing_job_field" and "prompt" in e.message and e.id is None


def test_limits_and_defaults_from_env():
    assert Limits.from_env({"SPOOL_MAX_N": "4", "SPOOL_MAX_JOB_BYTES": "1000"}) == Limits(max_n=4, max_job_bytes=1000)
    assert Defaults.from_env({"SPOOL_RESULT_TTL_S": "60"}).result_ttl_s == 60
    for bad in ({"SPOOL_MAX_N": "x"}, {"SPOOL_MAX_N": "0"}, {"SPOOL_MAX_N": "65"}):
        with pytest.raises(ValueError):
            Limits.from_env(bad)


# --- results and token events -------------------------------------------------------------------------

def test_result_round_trip_and_mirror():
    lp = [[TokenLogprob(token_id=5, logprob=-0.1, rank=1, token="a"), TokenLogprob(token_id=6, logprob=None)]]
    res = Result(id="r1", status="completed", choices=[
        Choice(index=0, text="Hello", token_ids=[5], finish_reason="length", logprobs=lp),
        Choice(index=1, text="Bye", token_ids=[6, 7], finish_reason="stop", stop_reason=7)],
        usage={"prompt_tokens": 3, "completion_tokens": 3}, metadata={"k": [1]}, worker="w0",
        timings={"enqueued": 1.0, "started": 2.0, "first_token": 2.5, "finished": 3})
    assert (res.text, res.token_ids, res.finish_reason, res.logprobs) == ("Hello", [5], "length", lp)
    doc = orjson.loads(res.to_json())
    assert set(doc) == {"v", "id", "status", "text", "token_ids", "finish_reason", "logprobs", "choices", "usage",
                        "error", "timings", "metadata", "worker"}
    assert doc["v"] == 2 and doc["error"] is None and doc["choices"][1]["stop_reason"] == 7
    assert Result.from_json(res.to_json()) == res
    assert Result.from_json(res.to_json().decode()) == res
    newer = orjson.dumps({**doc, "new_field": 1})
    assert Result.from_json(newer) == res  # old clients read newer workers' results


def test_failed_result_and_bad_results():
    res = Result.failed("f1", "invalid_job", "prompt: missing", metadata={"a": 1})
    doc = orjson.loads(res.to_json())
    assert (doc["status"], doc["error"], doc["choices"], doc["text"]) == (
        "failed", {"code": "invalid_job", "message": "prompt: missing"}, [], "")
    assert Result.failed("c1", "cancelled", "by user", status="cancelled").status == "cancelled"
    for bad in ({"id": "x", "status": "done"}, {"id": "a:b", "status": "failed"},
                {"id": "x", "status": "completed", "choices": [{"index": 1}]}):
        with pytest.raises(ValueError):
            Result.model_validate(bad)


def test_token_events_round_trip():
    lp = [[TokenLogprob(token_id=3, logprob=-0.25, rank=1, token="lo")]]
    events = [TokenEvent.delta(0, "Hel", [1, 2]), TokenEvent.delta(1, "lo", [3], finish_reason="stop", logprobs=lp),
              TokenEvent.restart("worker w1 died"), TokenEvent.done("completed", "length")]
    for ev in events:
        fields = ev.to_fields()
        assert set(fields) == {"type", "data"} and fields["type"] == ev.type.encode()
        back = TokenEvent.from_fields({k.encode(): v for k, v in fields.items()}, b"17-0")
        assert back.entry_id == "17-0" and back.model_copy(update={"entry_id": None}) == ev
    assert orjson.loads(events[0].to_fields()["data"]) == {"index": 0, "text": "Hel", "token_ids": [1, 2]}
    assert orjson.loads(events[2].to_fields()["data"]) == {"reason": "worker w1 died"}
    assert orjson.loads(events[3].to_fields()["data"]) == {"status": "completed", "finish_reason": "length"}
    assert [e.finished for e in events] == [False, False, False, True]
    assert "entry_id" not in TokenEvent.done("failed").model_dump()
    with pytest.raises(ValueError):
        TokenEvent.from_fields({"type": "bogus", "data": "{}"})
    with pytest.raises(ValueError):
        TokenEvent(type="done")  # a done event always says how the request ended


# --- generated schema files ---------------------------------------------------------------------------

def test_schema_files_are_current():
    assert schema_export.main(["--check"]) == 0, "run: python -m spool.protocol.schema_export"


def test_schema_export_check_detects_stale(tmp_path):
    assert schema_export.main(["--check", "--out", str(tmp_path)]) == 1
    assert schema_export.main(["--out", str(tmp_path)]) == 0
    assert schema_export.main(["--check", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "job.schema.json").read_text()
    assert text.endswith("}\n") and orjson.loads(text)["additionalProperties"] is False
    (tmp_path / "result.schema.json").write_text("{}\n")
    assert schema_export.main(["--check", "--out", str(tmp_path)]) == 1
