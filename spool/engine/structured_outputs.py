"""StructuredOutputsParams: vLLM's constraint on the generated text (JSON schema, regex, choice, EBNF, any JSON).

Only the request-side description lives here (plain pydantic, no xgrammar): its validation, the canonical
cache key and the text each kind compiles from. Compiling is spool/engine/grammar_compiler.py; the per-sequence
matcher is spool/engine/grammar.py.
"""
from __future__ import annotations

import json as _json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KINDS = ("json", "regex", "choice", "grammar", "json_object")
# Any JSON object, written as a schema so that it compiles with the same compact layout as `json` schemas.
ANY_OBJECT_SCHEMA = '{"type":"object"}'


class StructuredOutputsParams(BaseModel):
    """Exactly one constraint on the completion text (vLLM-compatible names); SamplingParams.structured_outputs."""

    # `json` shadows BaseModel.json, so the field is json_ under the alias "json" (and a `json` property).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)

    json_: dict[str, Any] | str | None = Field(
        None, alias="json", description="A JSON Schema, as a dict or a JSON string; the output is compact JSON."
    )
    regex: str | None = Field(None, min_length=1, description="The whole output must match this regex.")
    choice: list[str] | None = Field(None, min_length=1, description="The output is exactly one of these strings.")
    grammar: str | None = Field(None, min_length=1, description="An EBNF grammar (xgrammar/GBNF syntax), rule root.")
    json_object: bool | None = Field(None, description="True: the output is any JSON object.")

    @field_validator("json_")
    @classmethod
    def _json_is_schema(cls, v: dict | str | None) -> dict | str | None:
        if v is None:
            return v
        try:
            schema = _json.loads(v) if isinstance(v, str) else v
            _json.dumps(schema)  # a dict from Python code may hold values JSON cannot carry
        except (ValueError, TypeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            raise ValueError(f"json must be a JSON schema: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("json must be a JSON schema object")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsParams:
        given = [k for k in KINDS if self._value(k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})"
            )
        return self

    def _value(self, kind: str) -> Any:
        return self.json_ if kind == "json" else getattr(self, kind)

    @property
    def json(self) -> dict[str, Any] | str | None:  # type: ignore[override]  # vLLM's name for the schema
        """The JSON schema as given (dict or string), or None."""
        return self.json_

    @property
    def kind(self) -> str:
        """Which constraint this is: one of KINDS."""
        return next(k for k in KINDS if self._value(k) not in (None, False))

    def source(self) -> str:
        """The text the compiler takes: schema JSON, regex, or EBNF (a choice becomes an EBNF alternation)."""
        kind = self.kind
        if kind == "json":
            schema = _json.loads(self.json_) if isinstance(self.json_, str) else self.json_
            # Key order is kept, never sorted: a schema's property order is the order the output writes them.
            return _json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        if kind == "json_object":
            return ANY_OBJECT_SCHEMA
        if kind == "choice":
            # JSON string escapes (\" \\ \n \uXXXX) are also valid in xgrammar's EBNF string literals.
            return "root ::= " + " | ".join(_json.dumps(c, ensure_ascii=False) for c in self.choice)
        return self.regex if kind == "regex" else self.grammar

    def cache_key(self) -> tuple[str, str]:
        """(compiler entry point, canonical source): equal keys compile to the same grammar."""
        kind = self.kind
        entry = {"json": "json", "json_object": "json", "regex": "regex"}.get(kind, "grammar")
        return entry, self.source()
