"""Wire schema v1: the Job document a producer XADDs, and its validation (parse_job / parse_entry)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

import orjson
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from spool.protocol.chat import (
    LOGIT_BIAS_KEY, Message, NamedToolChoice, ResponseFormat, StrictInput, StructuredOutputs, Tool, ToolChoice,
)
from spool.protocol.commands import entry_field
from spool.protocol.defaults import (
    DEFAULT_LIMITS, ENGINE_MAX_LOGPROBS, ENGINE_MAX_N, ENGINE_MAX_STOP, MAX_STOP_STRING_CHARS, MAX_TOKEN_ID, Limits,
)
from spool.protocol.keys import validate_id
from spool.protocol.priorities import Priority
from spool.protocol.results import PROTOCOL_VERSION, IdStr, JsonObject

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
StopStr = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]

# Names that Job shares with engine SamplingParams, so the worker can do SamplingParams(**job.sampling_kwargs()).
SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids",
    "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
    "include_stop_str_in_output", "skip_special_tokens",
)


class JobError(ValueError):
    """A job document that cannot be accepted; `id` is set when one could be recovered safely."""

    def __init__(self, code: str, message: str, id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.id = code, message, id
        self.enqueued: list[str] = []  # enqueue_many: ids already sent before this job failed


class Job(StrictInput):
    """One prompt job: the JSON document in the `job` field of a jobs stream entry."""

    # Lets JSON Schema validators enforce "exactly one prompt field" too, not only this model.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": [k], "properties": {k: {"type": t}}}
        for k, t in (("prompt", "string"), ("messages", "array"), ("prompt_token_ids", "array"))]})

    v: int | None = Field(None, description="Protocol version; 1 when given.", json_schema_extra={
        "anyOf": [{"const": PROTOCOL_VERSION, "type": "integer"}, {"type": "null"}]})
    id: IdStr | None = Field(None, description="Request id; keys the result. Default: the stream entry id.")
    prompt: str | None = Field(None, min_length=1, description="Plain-text prompt.")
    messages: list[Message] | None = Field(None, min_length=1, description="Chat messages.")
    prompt_token_ids: list[TokenId] | None = Field(None, min_length=1, description="Pre-tokenized prompt.")
    n: int = Field(1, ge=1, le=ENGINE_MAX_N, description="Completions per prompt.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="0 means greedy (as OpenAI).")
    top_k: int = Field(0, ge=-1, description="0 or -1 disables top-k.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Any 64-bit integer.")
    max_tokens: int | None = Field(None, ge=1, description=(
        "New tokens per completion. Absent: the rest of the model's context (capped by Limits.max_tokens)."))
    min_tokens: int = Field(0, ge=0)
    stop: Annotated[list[StopStr], Field(max_length=ENGINE_MAX_STOP)] | None = Field(
        None, description="A stop string or a list of them.", json_schema_extra={"anyOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS},
            {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS},
             "maxItems": ENGINE_MAX_STOP},
            {"type": "null"}]})
    stop_token_ids: list[TokenId] | None = Field(None, max_length=ENGINE_MAX_STOP)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    logprobs: int | None = Field(None, ge=0, le=ENGINE_MAX_LOGPROBS, description="Top-N logprobs per token.")
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = Field(None, description=(
        "Token id (a decimal string, as in OpenAI) -> bias in [-100, 100], added to the logits."))
    response_format: ResponseFormat | None = Field(None, description="OpenAI: text, json_object or json_schema.")
    structured_outputs: StructuredOutputs | None = Field(None, description=(
        "vLLM: exactly one of json, regex, choice, grammar, json_object."))
    tools: list[Tool] | None = Field(None, max_length=128, description="Functions the model may call (chat).")
    tool_choice: ToolChoice | None = Field(None, description=(
        "none | auto | required | {type: function, function: {name}}; default auto when tools are given."))
    chat_template_kwargs: JsonObject | None = Field(None, description="Extra variables for the chat template.")
    add_generation_prompt: bool | None = Field(None, description="Default: true, false with continue_final_message.")
    continue_final_message: bool = Field(False, description="Continue the last (assistant) message instead.")
    stream: bool = Field(False, description="Write token deltas to the token stream.")
    priority: Priority | None = Field(None, description="Scheduling class; default: the stream's.")
    deadline: float | None = Field(None, gt=0, description="Unix epoch seconds; later starts expire.")
    metadata: JsonObject | None = Field(None, description="Opaque JSON object copied into the result.")

    @field_validator("v")
    @classmethod
    def _version(cls, v: int | None) -> int | None:
        if v is not None and v != PROTOCOL_VERSION:
            raise PydanticCustomError(
                "unsupported_version", "protocol version {v} is not supported (this is v{ours}; since v2 a request's "
                "keys carry its id in braces, as in spool:result:\x7bID\x7d: see docs/PROTOCOL.md)",
                {"v": v, "ours": PROTOCOL_VERSION},
            )
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        # One string is shorthand for a list of one (as in vLLM); normalizing here keeps error paths simple.
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Job:
        given = [k for k in ("prompt", "messages", "prompt_token_ids") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        self._check_chat_fields()
        limits = (info.context or {}).get("limits", DEFAULT_LIMITS)
        self._check_limits(limits)
        return self

    def _check_chat_fields(self) -> None:
        chat_only = [k for k in ("tools", "tool_choice", "chat_template_kwargs", "add_generation_prompt")
                     if getattr(self, k) is not None] + (["continue_final_message"] if self.continue_final_message else [])
        if chat_only and self.messages is None:
            raise ValueError(f"{', '.join(chat_only)} need messages")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
            if self.messages and self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message needs the last message to be from the assistant")
        for key, bias in (self.logit_bias or {}).items():
            if not LOGIT_BIAS_KEY.match(key) or int(key) > MAX_TOKEN_ID:
                raise ValueError(f"logit_bias key {key!r} is not a token id")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{key}] = {bias} is outside [-100, 100]")
        if self.logit_bias is not None and len(self.logit_bias) > 1024:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most 1024")
        constraints = [k for k in ("response_format", "structured_outputs") if getattr(self, k) is not None
                       and not (k == "response_format" and self.response_format.type == "text")]
        choice = self.tool_choice
        names = {t.function.name for t in self.tools or ()}
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        if constraints and (choice == "required" or isinstance(choice, NamedToolChoice)):
            raise ValueError(f"{constraints[0]} cannot be combined with tool_choice that forces a call")
        if len(constraints) > 1:
            raise ValueError("give response_format or structured_outputs, not both")

    def _check_limits(self, lim: Limits) -> None:
        if self.id is not None and len(self.id) > lim.max_id:
            raise PydanticCustomError("invalid_id", "id is longer than {n} characters", {"n": lim.max_id})
        chars = (len(self.prompt) if self.prompt is not None
                 else sum(len(m.content or "") for m in self.messages or ()))
        if chars > lim.max_prompt_chars:
            raise _too_large(f"prompt has {chars} characters; the limit is {lim.max_prompt_chars}")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) > lim.max_prompt_tokens:
            raise _too_large(f"prompt_token_ids has {len(self.prompt_token_ids)} ids; "
                             f"the limit is {lim.max_prompt_tokens}")
        for name, value, cap in (
            ("max_tokens", self.max_tokens or 0, lim.max_tokens),
            ("n", self.n, lim.max_n),
            ("number of stop strings", len(self.stop or ()), lim.max_stop),
            ("number of stop_token_ids", len(self.stop_token_ids or ()), lim.max_stop),
        ):
            if value > cap:
                raise ValueError(f"{name} is {value}; this deployment allows at most {cap}")

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for engine SamplingParams (vLLM names)."""
        kw = {k: getattr(self, k) for k in SAMPLING_FIELDS}
        kw["stop"], kw["stop_token_ids"] = list(self.stop or ()), list(self.stop_token_ids or ())
        if self.logit_bias:
            kw["logit_bias"] = {int(token): bias for token, bias in self.logit_bias.items()}
        return kw


def _too_large(message: str) -> PydanticCustomError:
    return PydanticCustomError("too_large", message)


# The id of a document that is not valid JSON is trusted only as the very first key of the top-level
# object: a nested "id" (in metadata, say) must never key a failed result over someone else's request.
_LEADING_ID_RE = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"([A-Za-z0-9._-]{1,128})"')


def _recover_id(raw: bytes, obj: Any = None) -> str | None:
    candidate = obj.get("id") if isinstance(obj, dict) else None
    if candidate is None and obj is None:
        m = _LEADING_ID_RE.match(raw)
        candidate = m.group(1).decode() if m else None
    try:
        return validate_id(candidate) if candidate is not None else None
    except ValueError:
        return None


def _describe(err: ValidationError, limit: int = 3) -> str:
    parts = []
    for e in err.errors()[:limit]:
        msg = e["msg"].removeprefix("Value error, ")
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = err.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _code(err: ValidationError) -> str:
    errors = err.errors()
    types = {e["type"] for e in errors}
    if "too_large" in types:
        return "too_large"
    if "invalid_id" in types or any(e["loc"][:1] == ("id",) for e in errors):
        return "invalid_id"
    if "unsupported_version" in types:
        return "unsupported_version"
    return "invalid_job"


def parse_job(raw: bytes | str, limits: Limits = DEFAULT_LIMITS) -> Job:
    """Parse and validate one job document; raise JobError(code, message, id_if_known)."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    if len(data) > limits.max_job_bytes:
        # Still worth recovering the id so the producer gets a result, but don't parse absurd documents.
        obj = _loads_or_none(data) if len(data) <= 64 * limits.max_job_bytes else None
        raise JobError("too_large", f"job document is {len(data)} bytes; the limit is {limits.max_job_bytes}",
                       _recover_id(data, obj))
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise JobError("invalid_json", f"job is not valid JSON: {e}", _recover_id(data)) from None
    if not isinstance(obj, dict):
        raise JobError("invalid_job", f"job must be a JSON object, got {type(obj).__name__}")
    try:
        return Job.model_validate(obj, context={"limits": limits})
    except ValidationError as e:
        raise JobError(_code(e), _describe(e), _recover_id(data, obj)) from None


def _loads_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def parse_entry(fields: Mapping[Any, Any], limits: Limits = DEFAULT_LIMITS) -> Job:
    """Parse the Job in a jobs stream entry's fields; JobError('missing_job_field') if there is none."""
    raw = entry_field(fields, "job")
    if raw is None:
        names = sorted(k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in fields)
        raise JobError("missing_job_field", f"stream entry has no 'job' field (fields: {names})")
    return parse_job(raw, limits)
