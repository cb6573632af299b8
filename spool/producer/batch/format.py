"""OpenAI request bodies -> spool jobs, validated exactly as a worker will: one path for a batch line and an
HTTP request (`spool serve`, spool/gateway/), whose bodies differ only in the HTTP-only fields (stream, ...).

Input line: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}.
`parse_body` judges a body, `job_document` turns it into the job document; `parse_line` does both for a line.
Responses are shaped by spool.producer.batch.responses. See docs/BATCH.md for every field: supported, accepted and
ignored, or rejected with a message that names it (docs/SERVER.md for the HTTP-only ones).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from spool.producer import ops
from spool.protocol import BATCH_PRIORITY, PRIORITIES, JobError, validate_id

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
MAX_CUSTOM_ID = 1024
# Accepted and ignored: they change nothing about the generated text.
IGNORED = frozenset({"user", "store", "metadata", "service_tier", "parallel_tool_calls", "stream_options"})
# Fields passed to the job unchanged (OpenAI's plus vLLM's extra parameters, same names as a Job); the
# job's validation is the one that judges them.
PASSTHROUGH = frozenset({
    "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
    "skip_special_tokens", "include_stop_str_in_output", "response_format", "structured_outputs",
})
CHAT_ONLY = frozenset({"tools", "tool_choice", "chat_template_kwargs", "add_generation_prompt",
                       "continue_final_message"})
# Fields accepted only with the value that means "off" (anything else would silently change the output).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (None, False), "echo": (None, False), "suffix": (None,), "functions": (None, []),
    "function_call": (None, "none"), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
}
COMPLETION_FIELDS = frozenset({"model", "prompt", "max_tokens", "logprobs", "best_of"}) | PASSTHROUGH
CHAT_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "logprobs",
                         "top_logprobs"}) | PASSTHROUGH | CHAT_ONLY
# Only in an HTTP request: a batch line has no stream, its request id comes from its custom_id and its
# priority from the batch.
HTTP_ONLY = frozenset({"stream", "stream_options", "request_id", "priority"})
STREAM_OPTIONS = frozenset({"include_usage", "continuous_usage_stats"})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


class LineError(ValueError):
    """An input line that cannot become a job: `code` and a message that names the field."""

    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.custom_id = code, message, custom_id


@dataclass(slots=True)
class Body:
    """A valid OpenAI request body: the job's build_job arguments and what shaping the response needs."""

    kind: str  # "chat" | "completion"
    model: str
    job: dict[str, Any]  # ops.build_job keyword arguments (prompt fields and sampling fields)
    top_logprobs: int | None  # None: no logprobs asked; else how many alternatives per token
    stream: bool = False  # HTTP only: answer with server-sent events
    include_usage: bool = False  # HTTP only: stream_options.include_usage
    priority: str | None = None  # HTTP only: the caller's choice, else the endpoint's default
    request_id: str | None = None  # HTTP only: the caller's request id (vLLM's extra field), else a new one


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
    try:
        parsed = parse_body(kind, obj.get("body"))
        rid = request_id(batch_id, cid)
        _, doc = job_document(ctx, parsed, id=rid, priority=BATCH_PRIORITY,
                              metadata={"batch": batch_id, "custom_id": cid}, default_max_tokens=default_max_tokens)
    except LineError as e:
        raise LineError(e.code, e.message, cid) from None
    return Request(line, cid, kind, parsed.model, rid, doc, parsed.top_logprobs)


def parse_body(kind: str, body: Any, *, http: bool = False) -> Body:
    """Judge the body of a chat ("chat") or completions ("completion") request; raise LineError naming the field.

    http=True also takes the HTTP-only fields (stream, stream_options, request_id, priority); in a batch line
    they keep their batch meaning (stream must be false, stream_options is ignored, the others are unsupported).
    """
    if not isinstance(body, dict):
        raise LineError("invalid_body", "body must be a JSON object")
    extra: dict[str, Any] = {}
    if http:
        extra = _http_fields(body)
        body = {k: v for k, v in body.items() if k not in HTTP_ONLY}
    kw = (_chat_job if kind == "chat" else _completion_job)(body)
    return Body(kind, body["model"], kw, kw.get("logprobs"), **extra)


def job_document(ctx: ops.Context, parsed: Body, *, id: str, priority: str, metadata: dict | None = None,
                 stream: bool = False, default_max_tokens: int | None = None) -> tuple[str, bytes]:
    """(jobs stream key, job document) of a parsed body, validated exactly as a worker will (LineError invalid_body)."""
    kw = dict(parsed.job)
    if "max_tokens" not in kw and default_max_tokens is not None:
        kw["max_tokens"] = default_max_tokens
    try:
        _, stream_key, doc = ops.build_job(ctx, id=id, priority=priority, metadata=metadata, stream=stream, **kw)
    except JobError as e:
        raise LineError("invalid_body", e.message) from None
    return stream_key, doc


def _http_fields(body: dict) -> dict[str, Any]:
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and type(stream) is not bool:
        raise LineError("invalid_body", "body.stream must be a boolean")
    out: dict[str, Any] = {"stream": bool(stream)}
    if options is not None:
        if not stream:
            raise LineError("invalid_body", "body.stream_options is only allowed when body.stream is true")
        if not isinstance(options, dict):
            raise LineError("invalid_body", "body.stream_options must be an object")
        for k, v in options.items():
            if k not in STREAM_OPTIONS:
                raise LineError("unsupported", f"body.stream_options.{k} is not a supported field")
            if v is not None and type(v) is not bool:
                raise LineError("invalid_body", f"body.stream_options.{k} must be a boolean")
        out["include_usage"] = bool(options.get("include_usage"))
    rid, priority = body.get("request_id"), body.get("priority")
    if rid is not None:
        try:
            out["request_id"] = validate_id(rid, "request id")
        except ValueError as e:
            raise LineError("invalid_body", f"body.request_id: {e}") from None
    if priority is not None:
        if priority not in PRIORITIES:
            raise LineError("invalid_body", f"body.priority must be one of {', '.join(PRIORITIES)}; got {priority!r}")
        out["priority"] = priority
    return out


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
    return {k: body[k] for k in allowed & (PASSTHROUGH | CHAT_ONLY) if body.get(k) is not None}


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


def _messages(messages: Any) -> list[dict[str, Any]]:
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
            if k not in MESSAGE_KEYS and v is not None:
                raise LineError("unsupported", f"{where}.{k} is not supported")
        message = {k: v for k, v in m.items() if k in MESSAGE_KEYS and v is not None}
        message["role"] = role
        message["content"] = _content(m.get("content"), where)
        out.append(message)
    return out


def _content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content  # null content is judged by the job (allowed beside assistant tool_calls)
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind != "text" or not isinstance(p.get("text"), str):
                raise LineError("unsupported", f"{where}.content[{j}]: {kind or 'this'} parts are not supported "
                                               "(text only: no images, audio or files)")
            parts.append(p["text"])
        return "".join(parts)
    raise LineError("invalid_body", f"{where}.content must be a string or a list of text parts")
