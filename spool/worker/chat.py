"""From a job to what the engine needs: the prompt (the chat template with its tools and variables) and
the constraint on the output (response_format, structured_outputs, or a tool call that tool_choice forces).

One path for every source: Client, a raw XADD and a batch line all arrive here as the same Job.
"""
from __future__ import annotations

from typing import Any

from spool.engine import LLMEngine
from spool.protocol import Job
from spool.protocol.chat import NamedToolChoice

AUTO, REQUIRED, NAMED = "auto", "required", "named"  # how the output becomes tool calls


def prompt_of(engine: LLMEngine, job: Job) -> Any:
    """The engine prompt: template-rendered ids for messages (the template owns special tokens)."""
    if job.messages is not None:
        continue_final = job.continue_final_message
        add_generation = not continue_final if job.add_generation_prompt is None else job.add_generation_prompt
        return engine.apply_chat_template(
            [m.template_dict() for m in job.messages], tools=tool_dicts(job),
            add_generation_prompt=add_generation, continue_final_message=continue_final,
            chat_template_kwargs=job.chat_template_kwargs)
    if job.prompt_token_ids is not None:
        return {"prompt_token_ids": job.prompt_token_ids}
    return job.prompt


def tool_dicts(job: Job) -> list[dict] | None:
    """Tool definitions as chat templates take them (OpenAI's shape)."""
    if not job.tools:
        return None
    return [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in job.tools]


def tool_mode(job: Job) -> str | None:
    """How this job's output turns into tool calls: None (it does not), AUTO, REQUIRED or NAMED."""
    choice = job.tool_choice
    if not job.tools or choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        return NAMED
    return REQUIRED if choice == "required" else AUTO


def constraint_of(job: Job) -> dict[str, Any] | None:
    """Keyword arguments of engine StructuredOutputsParams for this job, or None when unconstrained.

    json_schema is always enforced (as OpenAI's strict mode): the mask costs nothing extra. A forced tool
    call is constrained like vLLM's: the named function's arguments object, or for "required" an array of
    {name, parameters} objects, one of the tools each.
    """
    if job.structured_outputs is not None:
        return job.structured_outputs.engine_kwargs()
    fmt = job.response_format
    if fmt is not None and fmt.type == "json_object":
        return {"json_object": True}
    if fmt is not None and fmt.type == "json_schema":
        return {"json": fmt.json_schema.schema_ or {"type": "object"}}
    mode = tool_mode(job)
    if mode == NAMED:
        name = job.tool_choice.function.name  # type: ignore[union-attr]
        tool = next(t for t in job.tools if t.function.name == name)  # type: ignore[union-attr]
        return {"json": tool.function.parameters or {"type": "object"}}
    if mode == REQUIRED:
        calls = [{"type": "object", "properties": {"name": {"enum": [t.function.name]},
                                                   "parameters": t.function.parameters or {"type": "object"}},
                  "required": ["name", "parameters"]} for t in job.tools]  # type: ignore[union-attr]
        return {"json": {"type": "array", "minItems": 1, "items": {"anyOf": calls}}}
    return None
