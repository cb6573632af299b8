"""Hostile jobs-stream entries, each with what a worker must make of it (tests/test_hostile.py, bench/soak.py).

A case is the raw stream entry fields, exactly as any producer could XADD them, and the expected outcome:
a failed result with `code` keyed by `id` (None: keyed by the stream entry id, as for a job sent without
one), a dead letter whose reason starts with `code` when no usable id exists, or `code=None` for an odd but
valid job that must complete. Limits are the defaults (spool.protocol.defaults.Limits) and a 512-token model.
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson

MODEL_CONTEXT = 512  # max_position_embeddings of spool.testing.tiny_model


@dataclass(frozen=True, slots=True)
class Case:
    """One hostile entry and its expected fate."""

    name: str
    fields: dict[bytes, bytes]
    code: str | None  # error code; None means it completes
    id: str | None = None  # request id of its result; None: the entry id
    dead: bool = False  # no usable id: a dead letter instead of a result


def _doc(name: str, tag: str, **job) -> bytes:
    return orjson.dumps({"id": f"{tag}{name}", **job})


def _job(tag: str, name: str, code: str | None, **job) -> Case:
    """A JSON job with a valid id, prompt 'x' unless overridden."""
    body = {"prompt": "x", **job}
    return Case(name, {b"job": _doc(name, tag, **{k: v for k, v in body.items() if v is not ...})}, code, tag + name)


def _raw(tag: str, name: str, code: str, raw: bytes, with_id: bool = True) -> Case:
    """A raw document; with_id: it starts with {"id": ...} so the worker can recover the id."""
    rid = tag + name
    doc = b'{"id":"' + rid.encode() + b'",' + raw if with_id else raw
    return Case(name, {b"job": doc}, code, rid if with_id else None, dead=not with_id)


def _dead(name: str, code: str, fields: dict[bytes, bytes]) -> Case:
    return Case(name, fields, code, None, dead=True)


def corpus(tag: str = "h-") -> list[Case]:
    """Every case; `tag` prefixes the request ids so that several runs can share one Redis."""
    j = lambda name, code, **kw: _job(tag, name, code, **kw)  # noqa: E731
    bad_ids = {"id_space": "a b", "id_colon": "a:b", "id_star": "*", "id_glob": "spool:result:*",
               "id_newline": "a\nb", "id_crlf_inject": "x\r\nDEL spool:jobs", "id_10kb": "a" * 10_240,
               "id_empty": "", "id_unicode": "caf\u00e9", "id_slash": "../etc/passwd"}
    cases = [
        # Not JSON, or not an object.
        _raw(tag, "truncated_json", "invalid_json", b'"prompt": '),
        _raw(tag, "nan_literal", "invalid_json", b'"prompt":"x","temperature":NaN}'),
        _raw(tag, "inf_number", "invalid_json", b'"prompt":"x","top_p":1e999}'),
        _raw(tag, "invalid_utf8", "invalid_json", b'"prompt":"\xff\xfe\xfd"}'),
        _raw(tag, "lone_surrogate", "invalid_json", b'"prompt":"\\ud800"}'),
        _raw(tag, "trailing_garbage", "invalid_json", b'"prompt":"x"} trailing'),
        _raw(tag, "deep_nesting", "invalid_json", b'"prompt":"x","metadata":' + b'{"a":' * 2000 + b'1' + b'}' * 2001),
        _raw(tag, "no_id_garbage", "invalid_json", b"\x00\x01binary\xff garbage\x9c", with_id=False),
        _raw(tag, "plain_text", "invalid_json", b"please run this prompt", with_id=False),
        _raw(tag, "empty_document", "invalid_json", b"", with_id=False),
        _raw(tag, "json_array", "invalid_job", b"[1, 2, 3]", with_id=False),
        _raw(tag, "json_string", "invalid_job", b'"a string"', with_id=False),
        _raw(tag, "json_null", "invalid_job", b"null", with_id=False),
        # Invalid objects without an id: their id is the entry id, as for any job sent without one.
        Case("empty_object", {b"job": b"{}"}, "invalid_job"),
        Case("null_id_bad_field", {b"job": b'{"id":null,"prompt":"x","colour":"red"}'}, "invalid_job"),
        # Missing, extra and conflicting fields.
        j("missing_prompt", "invalid_job", prompt=...),
        j("extra_field", "invalid_job", colour="red"),
        j("typo_field", "invalid_job", max_token=5),
        j("prompt_and_messages", "invalid_job", messages=[{"role": "user", "content": "y"}]),
        j("all_three_prompts", "invalid_job", messages=[{"role": "user", "content": "y"}], prompt_token_ids=[1]),
        j("empty_prompt", "invalid_job", prompt=""),
        j("messages_empty", "invalid_job", prompt=..., messages=[]),
        j("message_bad_role", "invalid_job", prompt=..., messages=[{"role": "root", "content": "y"}]),
        j("message_extra_key", "invalid_job", prompt=..., messages=[{"role": "user", "content": "y", "x": 1}]),
        j("template_refuses_role", "invalid_prompt", prompt=...,
          messages=[{"role": "tool", "content": "y", "tool_call_id": "c1"}]),
        # Wrong types.
        j("prompt_int", "invalid_job", prompt=5),
        j("prompt_list", "invalid_job", prompt=["x"]),
        j("max_tokens_string", "invalid_job", max_tokens="16"),
        j("max_tokens_float", "invalid_job", max_tokens=16.0),
        j("ignore_eos_int", "invalid_job", ignore_eos=1),
        j("stream_string", "invalid_job", stream="yes"),
        j("messages_string", "invalid_job", prompt=..., messages="hi"),
        j("metadata_list", "invalid_job", metadata=[1, 2]),
        j("deadline_string", "invalid_job", deadline="tomorrow"),
        j("priority_bogus", "invalid_job", priority="urgent"),
        j("version_1", "unsupported_version", v=1),  # a producer of the v1 key layout
        j("version_3", "unsupported_version", v=3),
        # Out-of-range numbers.
        j("max_tokens_zero", "invalid_job", max_tokens=0),
        j("max_tokens_negative", "invalid_job", max_tokens=-5),
        j("max_tokens_beyond_limit", "invalid_job", max_tokens=1_000_000),
        j("min_over_max_tokens", "invalid_job", max_tokens=4, min_tokens=9),
        j("n_10000", "invalid_job", n=10_000),
        j("n_zero", "invalid_job", n=0),
        j("temperature_negative", "invalid_job", temperature=-1.0),
        j("temperature_huge", "invalid_job", temperature=1e300),
        j("top_p_negative", "invalid_job", top_p=-0.5),
        j("top_k_negative", "invalid_job", top_k=-7),
        j("seed_fraction", "invalid_job", seed=1.5),
        _raw(tag, "seed_bignum", "invalid_job", b'"prompt":"x","seed":1000000000000000000000000000000}'),
        j("logprobs_1000", "invalid_job", logprobs=1000),
        j("penalty_out_of_range", "invalid_job", presence_penalty=-9.5),
        j("deadline_negative", "invalid_job", deadline=-1.0),
        # Too much of something.
        j("stop_10000", "invalid_job", stop=["s"] * 10_000),
        j("stop_string_too_long", "invalid_job", stop="s" * 300),
        j("stop_token_ids_negative", "invalid_job", stop_token_ids=[-1]),
        j("huge_prompt", "too_large", prompt="x" * 300_000),
        j("huge_document", "too_large", metadata={"blob": "y" * (2 << 20)}),
        j("huge_prompt_token_ids", "too_large", prompt=..., prompt_token_ids=[1] * 140_000),
        j("token_id_out_of_range", "invalid_job", prompt=..., prompt_token_ids=[2**40]),
        j("token_id_beyond_vocab", "invalid_prompt", prompt=..., prompt_token_ids=[1_000_000]),
        j("prompt_longer_than_model", "invalid_prompt", prompt=..., prompt_token_ids=[7] * (MODEL_CONTEXT + 8)),
        j("max_tokens_beyond_model", "invalid_prompt", max_tokens=MODEL_CONTEXT + 100),
        # Entries without a usable id: dead letters.
        *(_dead(name, "invalid_id", {b"job": orjson.dumps({"id": bad, "prompt": "x"})})
          for name, bad in bad_ids.items()),
        _dead("id_int", "invalid_id", {b"job": b'{"id":5,"prompt":"x"}'}),
        _dead("no_job_field", "missing_job_field", {b"prompt": b"x", b"id": b"h-nojob"}),
        _dead("misspelt_job_field", "missing_job_field", {b"jobs": b'{"prompt":"x"}'}),
        _dead("binary_field_names", "missing_job_field", {b"\xff\xfe\x00": b"\x00\x01"}),
        # Odd but valid: these must simply complete.
        j("nul_and_controls", None, prompt="a\u0000b\u0007c\u001b[31m"),
        j("emoji_and_rtl", None,
          prompt="\U0001F468\u200d\U0001F469\u200d\U0001F467 \u202eabc \u05e9\u05dc\u05d5\u05dd"),
        j("escaped_keys_lookalike", None, prompt="x", metadata={"id": "someone-else", "spool:result:*": 1}),
    ]
    return cases


def bad_cases(tag: str = "h-") -> list[Case]:
    """Only the cases that must fail (or dead-letter)."""
    return [c for c in corpus(tag) if c.code is not None]
