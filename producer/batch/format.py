"""OpenAI Batch API lines: parse an input line into a spool job, shape a spool Result into an output line.

Input: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}.
Output: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {code, message}
| null}, with chat.completion / text_completion bodies. See docs/BATCH.md for the supported fields.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from producer import ops
from protocol import BATCH_PRIORITY, JobError, Result

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
MAX_CUSTOM_ID = 1024
# Accepted and ignored: they change nothing about the generated text.
IGNORED = frozenset({"user", "store", "metadata", "service_tier", "parallel_tool_calls", "stream_options"})
# Sampling fields passed to the job unchanged (OpenAI's plus vLLM's extra parameters, same names as a Job).
PASSTHROUGH = frozenset({
    "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
    "skip_special_tokens", "include_stop_str_in_output",
})
# Fields accepted only with the value that means "off" (anything else would silently change the output).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (None, False), "echo": (None, False), "suffix": (None,), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
}
COMPLETION_FIELDS = frozenset({"model", "prompt", "max_tokens", "logprobs", "best_of"}) | PASSTHROUGH
CHAT_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "logprobs",
                         "top_logprobs"}) | PASSTHROUGH
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
NO_LOGPROB = -9999.0  # what OpenAI reports for a token of probability 0 (-inf is not JSON)


class LineError(ValueError):
    """An input line that cannot become a job: `code` and a message that names the field."""

    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.custom_id = code, message, custom_id


@dataclass(slots=True)
class Request:
    """One valid input line, ready to enqueue."""

    line: int
    custom_id: str
    kind: str  # "chat" | "completion"
    model: str
    rid: str
    raw: bytes  # the job document
    top_logprobs: int | None  # None: no logprobs asked; else how many alternatives per token


def cid_hash(custom_id: str) -> bytes:
    """12-byte digest of a custom_id: names its request id and de-duplicates lines."""
    return hashlib.blake2b(custom_id.encode(), digest_size=12).digest()


def cid_key(custom_id: str) -> bytes:
    """8 bytes of the digest: the member of the Redis sets of seen / written custom_ids."""
    return cid_hash(custom_id)[:8]


def request_id(batch_id: str, custom_id: str) -> str:
    """Deterministic request id of a line, so a resumed run finds the job a previous run enqueued."""
    return f"b-{batch_id}-{cid_hash(custom_id).hex()}"


def line_record_id(batch_id: str, line: int) -> str:
    """The output id of a line rejected by validation (it never becomes a request)."""
    return f"batch_req_b-{batch_id}-line{line}"


def parse_record_id(record_id: Any) -> tuple[str, int | None] | None:
    """(batch id, rejected line number or None) from an output line's id; None if spool did not write it."""
    if not isinstance(record_id, str) or not record_id.startswith("batch_req_b-"):
        return None
    batch, sep, tail = record_id[len("batch_req_b-"):].rpartition("-")
    if not sep:
        return None
    if tail.startswith("line") and tail[4:].isdigit():
        return batch, int(tail[4:])
    return batch, None


def parse_line(ctx: ops.Context, raw: bytes, line: int, batch_id: str, default_max_tokens: int | None) -> Request:
    """Validate one input line exactly as a worker would validate its job; raise LineError."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise LineError("invalid_json", f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LineError("invalid_request", "a line must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID:
        raise LineError("invalid_request", f"custom_id must be a string of 1..{MAX_CUSTOM_ID} characters")
    extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if extra:
        raise LineError("invalid_request", f"unknown keys {extra}", cid)
    if obj.get("method") != "POST":
        raise LineError("invalid_request", f"method must be POST, got {obj.get('method')!r}", cid)
    kind = URLS.get(obj.get("url"))  # type: ignore[arg-type]
    if kind is None:
        raise LineError("invalid_url", f"url must be one of {', '.join(URLS)}; got {obj.get('url')!r}", cid)
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_body", "body must be a JSON object", cid)
    try:
        kw = (_chat_job if kind == "chat" else _completion_job)(body)
        if "max_tokens" not in kw and default_max_tokens is not None:
            kw["max_tokens"] = default_max_tokens
        rid = request_id(batch_id, cid)
        metadata = {"batch": batch_id, "custom_id": cid}
        _, _, doc = ops.build_job(ctx, id=rid, priority=BATCH_PRIORITY, metadata=metadata, **kw)
    except LineError as e:
        raise LineError(e.code, e.message, cid) from None
    except JobError as e:
        raise LineError("invalid_body", e.message, cid) from None
    return Request(line, cid, kind, body["model"], rid, doc, kw.get("logprobs"))


def _common(body: dict, allowed: frozenset[str]) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise LineError("invalid_body", "body.model must be a non-empty string")
    for k, v in body.items():
        if k in allowed or k in IGNORED:
            continue
        if k in NEUTRAL:
            if v not in NEUTRAL[k]:
                raise LineError("unsupported", f"body.{k}={orjson.dumps(v).decode()[:80]} is not supported")
            continue
        raise LineError("unsupported", f"body.{k} is not a supported field")
    return {k: body[k] for k in PASSTHROUGH if body.get(k) is not None}


def _completion_job(body: dict) -> dict[str, Any]:
    kw = _common(body, COMPLETION_FIELDS)
    best_of = body.get("best_of")
    if best_of is not None and best_of != kw.get("n", 1):
        raise LineError("unsupported", "body.best_of other than n is not supported")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        kw["prompt"] = prompt
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        kw["prompt_token_ids"] = prompt
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise LineError("unsupported", f"body.prompt holds {len(prompt)} prompts; put one prompt per line")
    else:
        raise LineError("invalid_body", "body.prompt must be a string, a list of token ids, or a list of one of those")
    if body.get("max_tokens") is not None:
        kw["max_tokens"] = body["max_tokens"]
    if body.get("logprobs") is not None:
        kw["logprobs"] = body["logprobs"]
    return kw


def _chat_job(body: dict) -> dict[str, Any]:
    kw = _common(body, CHAT_FIELDS)
    kw["messages"] = _messages(body.get("messages"))
    mt, mct = body.get("max_tokens"), body.get("max_completion_tokens")
    if mt is not None and mct is not None and mt != mct:
        raise LineError("invalid_body", "body.max_tokens and body.max_completion_tokens disagree")
    if mct is not None or mt is not None:
        kw["max_tokens"] = mct if mct is not None else mt
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want is not None and type(want) is not bool:
        raise LineError("invalid_body", "body.logprobs must be a boolean for chat completions")
    if top is not None and not want:
        raise LineError("invalid_body", "body.top_logprobs needs body.logprobs = true")
    if want:
        kw["logprobs"] = 0 if top is None else top
    return kw


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_body", "body.messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict):
            raise LineError("invalid_body", f"{where} must be an object")
        role = ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise LineError("invalid_body", f"{where}.role must be one of {', '.join(ROLES)}")
        for k, v in m.items():
            if k not in ("role", "content", "name") and v is not None:
                raise LineError("unsupported", f"{where}.{k} is not supported")
        out.append({"role": role, "content": _content(m.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise LineError("unsupported", f"{where}.content: only text parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise LineError("invalid_body", f"{where}.content must be a string or a list of text parts")


def output_record(req: Request, res: Result) -> dict:
    """The output line of a final Result: a response for a completed job, else an error."""
    rid, kind = req.rid, req.kind
    rec: dict[str, Any] = {"id": f"batch_req_{rid}", "custom_id": req.custom_id, "response": None, "error": None}
    if res.status != "completed":
        code = res.error.code if res.error else res.status
        msg = res.error.message if res.error else f"request {res.status}"
        rec["error"] = {"code": code, "message": msg}
        return rec
    shape = _chat_choice if kind == "chat" else _completion_choice
    body = {
        "id": ("chatcmpl-" if kind == "chat" else "cmpl-") + rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(res.timings.finished or res.timings.started or 0),
        "model": req.model,
        "choices": [shape(c, req.top_logprobs) for c in res.choices],
        "usage": {"prompt_tokens": res.usage.prompt_tokens, "completion_tokens": res.usage.completion_tokens,
                  "total_tokens": res.usage.prompt_tokens + res.usage.completion_tokens},
    }
    rec["response"] = {"status_code": 200, "request_id": rid, "body": body}
    return rec


def error_record(batch_id: str, line: int, custom_id: str | None, code: str, message: str) -> dict:
    """The output line of an input line rejected by validation (--skip-invalid)."""
    return {"id": line_record_id(batch_id, line), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": f"line {line}: {message}"}, "line": line}


def _completion_choice(c, k: int | None) -> dict:
    lp = None
    if k is not None and c.logprobs is not None:
        tokens, token_lps, tops, offsets, at = [], [], [], [], 0
        for tid, cands in zip(c.token_ids, c.logprobs):
            chosen = next((x for x in cands if x.token_id == tid), cands[0])
            tok = chosen.token or ""
            tokens.append(tok)
            token_lps.append(_lp(chosen.logprob))
            tops.append({(x.token or ""): _lp(x.logprob) for x in cands})
            offsets.append(at)
            at += len(tok)
        lp = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
    return {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": lp}


def _chat_choice(c, k: int | None) -> dict:
    lp = None
    if k is not None and c.logprobs is not None:
        content = []
        for tid, cands in zip(c.token_ids, c.logprobs):
            chosen = next((x for x in cands if x.token_id == tid), cands[0])
            top = [x for x in cands if x.rank is not None and x.rank <= k]  # the sampled token may rank lower
            content.append({**_tok(chosen), "top_logprobs": [_tok(x) for x in sorted(top, key=lambda x: x.rank)]})
        lp = {"content": content, "refusal": None}
    return {"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": lp, "finish_reason": c.finish_reason}


def _tok(x) -> dict:
    tok = x.token or ""
    return {"token": tok, "logprob": _lp(x.logprob), "bytes": list(tok.encode())}


def _lp(v: float | None) -> float:
    return NO_LOGPROB if v is None else v
