"""Generated text -> OpenAI tool calls, for the two formats chat templates teach models.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2/2.5/3), with any
  text before them as the message content.
- llama3_json: the whole output is `{"name": ..., "parameters": {...}}` (Llama 3.1/3.2; several calls
  separated by `;`), optionally after `<|python_tag|>`.

The parser comes from the model's chat template (`parser_for`) unless the worker names one
(`--tool-call-parser`). Output that does not parse stays plain content: a model that chose to answer in
words under tool_choice "auto" did nothing wrong.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from spool.protocol import ToolCall
from spool.worker.chat import NAMED, REQUIRED

PARSERS = ("hermes", "llama3_json")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parser_for(chat_template: str | None, configured: str = "auto") -> str:
    """The parser to use: the configured one, else the one the chat template's markup implies."""
    if configured != "auto":
        if configured not in PARSERS:
            raise ValueError(f"unknown tool call parser {configured!r}: use auto, {', '.join(PARSERS)}")
        return configured
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def extract(text: str, mode: str, parser: str, request_id: str, index: int) -> tuple[str | None, list[ToolCall]]:
    """(message content, tool calls) of one choice's text under tool mode `mode`."""
    if mode == NAMED:
        return None, []  # the caller names the function: the whole text is its arguments (see named_call)
    if mode == REQUIRED:
        calls = _json_calls(text, "parameters")
        return (None, _calls(calls, request_id, index)) if calls else (text, [])
    if parser == "llama3_json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        calls = [c for part in body.split(";") if part.strip() for c in _json_calls(part, "parameters") or [None]]
        if calls and all(c is not None for c in calls):
            return None, _calls(calls, request_id, index)
        return text, []
    found = [m.group(1) for m in _HERMES.finditer(text)]
    calls = [c for block in found for c in _json_calls(block, "arguments") or [None]]
    if not found or not all(c is not None for c in calls):
        return text, []
    content = text[: text.index("<tool_call>")].strip()
    return (content or None), _calls(calls, request_id, index)


def named_call(text: str, name: str, request_id: str, index: int) -> list[ToolCall]:
    """The one call of a named tool_choice: the generated text is the arguments object."""
    return _calls([(name, text.strip())], request_id, index)


def _json_calls(text: str, arguments_key: str) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] from a call object or an array of them; None if it is not one."""
    try:
        value = orjson.loads(text.strip())
    except orjson.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args: Any = item.get(arguments_key, item.get("arguments", item.get("parameters", {})))
        out.append((item["name"], args if isinstance(args, str) else orjson.dumps(args).decode()))
    return out


def _calls(pairs: list[tuple[str, str]], request_id: str, index: int) -> list[ToolCall]:
    # Ids derive from the request, so a result written twice (two runs of one job) carries the same ids.
    return [ToolCall(id="call_" + hashlib.sha1(f"{request_id}:{index}:{k}".encode()).hexdigest()[:24],
                     function={"name": name, "arguments": arguments})
            for k, (name, arguments) in enumerate(pairs)]
