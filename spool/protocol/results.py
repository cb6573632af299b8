"""Documents the worker writes: the Result at result:{id} and the events of the token stream tokens:{id}."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from spool.protocol.commands import entry_field
from spool.protocol.defaults import MAX_ID_LEN
from spool.protocol.keys import ID_PATTERN

# v2: request keys carry the id as a cluster hash tag (spool:result:{id}). Lives here, below spool.protocol.job,
# so both documents share it without a cycle.
PROTOCOL_VERSION = 2

Status = Literal["completed", "failed", "cancelled", "expired"]
FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]
IdStr = Annotated[str, Field(pattern=ID_PATTERN, min_length=1, max_length=MAX_ID_LEN)]
JsonObject = dict[str, Any]


class _Output(BaseModel):
    # Ignore unknown keys so old clients can read the documents of newer workers (additive changes).
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TokenLogprob(_Output):
    """One candidate token at one position: id, log probability (null for -inf), rank, text."""

    token_id: int
    logprob: float | None
    rank: int | None = None
    token: str | None = None
    bytes: list[int] | None = Field(None, description="The token's exact bytes (a token may be part of a character).")


PositionLogprobs = list[TokenLogprob]


class FunctionCallOut(_Output):
    """The function a tool call invokes, with its arguments as a JSON string (OpenAI's shape)."""

    name: str
    arguments: str


class ToolCall(_Output):
    """One tool call parsed from a completion (OpenAI's message.tool_calls item)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class Choice(_Output):
    """One of the n completions of a request."""

    index: int = Field(ge=0)
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(None, description="The stop string or token id that ended it.")
    logprobs: list[PositionLogprobs] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="Tool calls parsed from text (jobs with tools).")
    content: str | None = Field(None, description="With tool_calls: the text outside the calls, if any.")


class Usage(_Output):
    """Token counts of a request (completion_tokens summed over choices)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = Field(0, description="Prompt tokens served from the prefix cache.")


class ErrorInfo(_Output):
    """Why a request failed, was cancelled or expired."""

    code: str
    message: str


class Timings(_Output):
    """Unix epoch seconds of a request's milestones."""

    enqueued: float | None = None
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None


class Result(_Output):
    """Final outcome of a request: the JSON at `{prefix}result:{id}`."""

    v: int = PROTOCOL_VERSION
    id: IdStr
    status: Status
    text: str = Field("", description="choices[0].text")
    token_ids: list[int] = Field(default_factory=list, description="choices[0].token_ids")
    finish_reason: FinishReason | None = Field(None, description="choices[0].finish_reason")
    logprobs: list[PositionLogprobs] | None = Field(None, description="choices[0].logprobs")
    choices: list[Choice] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    error: ErrorInfo | None = None
    timings: Timings = Field(default_factory=Timings)
    metadata: JsonObject | None = None
    worker: str | None = None

    @model_validator(mode="after")
    def _mirror_first_choice(self) -> Result:
        if [c.index for c in self.choices] != list(range(len(self.choices))):
            raise ValueError("choices must be ordered by index 0..n-1")
        if self.choices:  # one source of truth: the top-level fields always equal choice 0
            c = self.choices[0]
            self.text, self.token_ids, self.finish_reason, self.logprobs = (
                c.text, c.token_ids, c.finish_reason, c.logprobs)
        return self

    @classmethod
    def failed(cls, id: str, code: str, message: str, *, status: Status = "failed", **kw: Any) -> Result:
        """A result that carries only an error (status failed, cancelled or expired)."""
        return cls(id=id, status=status, error=ErrorInfo(code=code, message=message), **kw)

    def to_json(self) -> bytes:
        """The wire JSON (every key present)."""
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Result:
        """Parse a result document."""
        return cls.model_validate(orjson.loads(raw))


class DeltaData(_Output):
    """`data` of a delta entry: new text and token ids of one choice; finish_reason on its last delta."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[PositionLogprobs] | None = None


class DoneData(_Output):
    """`data` of the done entry: the request is final and its result key is set."""

    status: Status
    finish_reason: FinishReason | None = None


class RestartData(_Output):
    """`data` of a restart entry: a worker re-runs the job; drop partial output seen so far."""

    reason: str = ""


EventType = Literal["delta", "done", "restart"]
EVENT_DATA: dict[str, type[_Output]] = {"delta": DeltaData, "done": DoneData, "restart": RestartData}
_EVENT_KEYS = {kind: tuple(model.model_fields) for kind, model in EVENT_DATA.items()}


def _dump_model(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class TokenEvent(_Output):
    """One entry of a token stream, decoded; entry_id is the stream entry id to resume after."""

    type: EventType
    index: int = 0
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: FinishReason | None = None
    status: Status | None = None
    reason: str | None = None
    logprobs: list[PositionLogprobs] | None = None
    entry_id: str | None = Field(None, exclude=True)

    @property
    def finished(self) -> bool:
        """True for the done event: nothing follows it."""
        return self.type == "done"

    @classmethod
    def delta(cls, index: int, text: str, token_ids: list[int], **kw: Any) -> TokenEvent:
        """New output of choice `index`."""
        return cls(type="delta", index=index, text=text, token_ids=token_ids, **kw)

    @classmethod
    def done(cls, status: Status, finish_reason: FinishReason | None = None) -> TokenEvent:
        """The final event of every request, streaming or not."""
        return cls(type="done", status=status, finish_reason=finish_reason)

    @classmethod
    def restart(cls, reason: str) -> TokenEvent:
        """A reclaimed job starts over."""
        return cls(type="restart", reason=reason)

    @model_validator(mode="after")
    def _done_has_status(self) -> TokenEvent:
        if self.type == "done" and self.status is None:
            raise ValueError("a done event needs a status")
        return self

    def to_fields(self) -> dict[str, bytes]:
        """Stream entry fields: {'type': ..., 'data': JSON} (null values left out)."""
        data = {k: v for k in _EVENT_KEYS[self.type] if (v := getattr(self, k)) is not None}
        return {"type": self.type.encode(), "data": orjson.dumps(data, default=_dump_model)}

    @staticmethod
    def delta_fields(index: int, text: str, token_ids: list[int], logprobs: list[PositionLogprobs] | None = None,
                     finish_reason: FinishReason | None = None) -> dict[str, bytes]:
        """The fields of a delta entry, as `TokenEvent.delta(...).to_fields()` writes them, built without a model.

        The worker writes one per request per stream interval from values it made itself: no validation needed.
        """
        data: dict[str, Any] = {"index": index, "text": text, "token_ids": token_ids}
        if finish_reason is not None:
            data["finish_reason"] = finish_reason
        if logprobs is not None:
            data["logprobs"] = logprobs
        return {"type": b"delta", "data": orjson.dumps(data, default=_dump_model)}

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any], entry_id: str | bytes | None = None) -> TokenEvent:
        """Decode stream entry fields (bytes or str keys); one validation, against this model."""
        kind = entry_field(fields, "type")
        kind = kind.decode() if isinstance(kind, bytes) else kind
        keys = _EVENT_KEYS.get(kind)  # type: ignore[arg-type]
        if keys is None:
            raise ValueError(f"unknown token event type {kind!r}")
        raw = entry_field(fields, "data")
        data = orjson.loads(raw) if raw is not None else {}
        if not isinstance(data, dict):
            raise ValueError(f"token event data must be a JSON object, got {type(data).__name__}")
        # Only the keys of this type's data model (a newer worker's extra keys are ignored, as the models do).
        values = {k: data[k] for k in keys if k in data}
        if kind == "restart" and values.get("reason") is None:
            values["reason"] = ""  # RestartData's default
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return cls.model_validate({"type": kind, "entry_id": eid, **values})
