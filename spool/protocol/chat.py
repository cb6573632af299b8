"""The OpenAI-shaped parts of a job document: chat messages with tool calls, tool definitions and choice,
response_format, and vLLM's structured_outputs. Validated here once, whether the job came from Client,
a raw XADD or a batch line."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

JsonObject = dict[str, Any]
FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class StrictInput(BaseModel):
    # Strict so every language sees the same rules ("16" is not 16, 1 is not true); extra keys are typos.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class FunctionCall(StrictInput):
    """A function call an assistant message made: its name and its arguments as a JSON string."""

    name: str = Field(min_length=1)
    arguments: str


class ToolCallIn(StrictInput):
    """One tool call of an assistant message in a conversation being replayed."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(StrictInput):
    """One chat message; the worker renders messages with the model's chat template."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(None, description="Text; null only for an assistant message with tool_calls.")
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="Calls an assistant message made.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (null only beside assistant tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry tool_call_id")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (tool call arguments decoded, as transformers does)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(text: str) -> Any:
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


class FunctionDef(StrictInput):
    """A function the model may call."""

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: JsonObject | None = Field(None, description="JSON Schema of the arguments object.")
    strict: bool | None = None


class Tool(StrictInput):
    """A tool definition (OpenAI shape): only functions."""

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(StrictInput):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(StrictInput):
    """tool_choice naming one function: the model must call exactly that function."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(StrictInput):
    """response_format.json_schema."""

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: JsonObject | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictInput):
    """OpenAI response_format: text, json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _shape(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is given exactly when type is json_schema")
        return self


class StructuredOutputs(StrictInput):
    """vLLM's structured_outputs: exactly one constraint on the generated text."""

    json_: JsonObject | str | None = Field(None, alias="json", description="A JSON Schema (object or string).")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1, description="An EBNF grammar (xgrammar syntax).")
    json_object: bool | None = Field(None, description="true: any JSON object.")

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            names = [g.rstrip("_") for g in given]
            raise ValueError(f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object "
                             f"(got {names or 'none'})")
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of engine StructuredOutputsParams (vLLM names)."""
        if self.json_ is not None:
            return {"json": self.json_}
        for name in ("regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return {name: getattr(self, name)}
        return {"json_object": True}


LOGIT_BIAS_KEY = re.compile(r"^(0|[1-9][0-9]{0,9})$")
