"""A spool Result shaped as OpenAI's chat.completion / text_completion, exactly as the openai SDK's types read
them (tests validate every line with `openai.types`): the body of a batch output line and of an HTTP reply
(`spool serve`), and the per-token pieces the HTTP server's streamed chunks are made of.

Output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": {code, message} | null}.
"""
from __future__ import annotations

from typing import Any

from spool.producer.batch.format import Request, line_record_id
from spool.protocol import Result, Usage

NO_LOGPROB = -9999.0  # what OpenAI reports for a token of probability 0 (-inf is not JSON)
OBJECTS = {"chat": "chat.completion", "completion": "text_completion"}
ID_PREFIXES = {"chat": "chatcmpl-", "completion": "cmpl-"}


def output_record(req: Request, res: Result) -> dict:
    """The output line of a final Result: a response for a completed job, else an error."""
    rid = req.rid
    rec: dict[str, Any] = {"id": f"batch_req_{rid}", "custom_id": req.custom_id, "response": None, "error": None}
    if res.status != "completed":
        code = res.error.code if res.error else res.status
        msg = res.error.message if res.error else f"request {res.status}"
        rec["error"] = {"code": code, "message": msg}
        return rec
    body = completion_body(req.kind, rid, req.model, res, req.top_logprobs)
    rec["response"] = {"status_code": 200, "request_id": rid, "body": body}
    return rec


def completion_body(kind: str, rid: str, model: str, res: Result, top_logprobs: int | None) -> dict:
    """The chat.completion ("chat") or text_completion ("completion") body of a completed Result."""
    shape = chat_choice if kind == "chat" else completion_choice
    return {
        "id": ID_PREFIXES[kind] + rid,
        "object": OBJECTS[kind],
        "created": int(res.timings.finished or res.timings.started or 0),
        "model": model,
        "choices": [shape(c, top_logprobs) for c in res.choices],
        "usage": usage_body(res.usage),
    }


def usage_body(usage: Usage) -> dict:
    """OpenAI's usage object, with the prompt tokens served from the prefix cache."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def error_record(batch_id: str, line: int, custom_id: str | None, code: str, message: str) -> dict:
    """The output line of an input line rejected by validation (--skip-invalid)."""
    return {"id": line_record_id(batch_id, line), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": f"line {line}: {message}"}, "line": line}


def completion_choice(c, k: int | None) -> dict:
    """One text_completion choice."""
    lp = None
    if k is not None and c.logprobs is not None:
        lp, _ = completion_logprobs(c.token_ids, c.logprobs)
    return {"index": c.index, "text": c.text, "finish_reason": finish_reason(c.finish_reason), "logprobs": lp}


def completion_logprobs(token_ids, logprobs, seen: bytes = b"") -> tuple[dict, bytes]:
    """Completions' legacy logprobs {tokens, token_logprobs, top_logprobs, text_offset} of some tokens, and the
    bytes generated up to their end (`seen`: the bytes before them, so offsets continue across streamed chunks)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, cands in zip(token_ids, logprobs):
        chosen = next((x for x in cands if x.token_id == tid), cands[0])
        tokens.append(_token_text(chosen))
        token_lps.append(_lp(chosen.logprob))
        tops.append(_top_dict(cands))
        offsets.append(len(seen.decode("utf-8", errors="ignore")))  # characters complete before this token
        seen += _raw(chosen)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, seen


def chat_choice(c, k: int | None) -> dict:
    """One chat.completion choice: the assistant message (tool calls parsed by the worker), logprobs."""
    lp = None
    if k is not None and c.logprobs is not None:
        lp = {"content": chat_logprobs(c.token_ids, c.logprobs, k), "refusal": None}
    message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
    if c.tool_calls:
        message["content"] = c.content
        message["tool_calls"] = [t.model_dump(mode="json") for t in c.tool_calls]
    return {"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish_reason(c.finish_reason)}


def chat_logprobs(token_ids, logprobs, k: int) -> list[dict]:
    """Chat logprobs' content items {token, logprob, bytes, top_logprobs} of some tokens."""
    content = []
    for tid, cands in zip(token_ids, logprobs):
        chosen = next((x for x in cands if x.token_id == tid), cands[0])
        top = [x for x in cands if x.rank is not None and x.rank <= k]  # the sampled token may rank lower
        content.append({**_tok(chosen), "top_logprobs": [_tok(x) for x in sorted(top, key=lambda x: x.rank)]})
    return content


def finish_reason(reason: str | None) -> str | None:
    """OpenAI has no "abort" or "error" for a completed response; an aborted choice stopped early."""
    return "stop" if reason in ("abort", "error") else reason


def _raw(x) -> bytes:
    return bytes(x.bytes) if x.bytes is not None else (x.token or "").encode()


def _token_text(x) -> str:
    """The token as text; a token holding part of a UTF-8 character is spelled `bytes:\\xNN...` (its
    exact bytes), never U+FFFD, so two such tokens never look the same."""
    raw = _raw(x)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _top_dict(cands) -> dict[str, float]:
    """Completions' top_logprobs: token text -> logprob, with no candidate lost to a clash of keys."""
    out: dict[str, float] = {}
    for x in cands:
        key = _token_text(x)
        out[key if key not in out else f"token_id:{x.token_id}"] = _lp(x.logprob)
    return out


def _tok(x) -> dict:
    return {"token": _token_text(x), "logprob": _lp(x.logprob), "bytes": list(_raw(x))}


def _lp(v: float | None) -> float:
    return NO_LOGPROB if v is None else v
