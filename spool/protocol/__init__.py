"""spool's wire contract, shared by the worker and the clients: keys, documents, limits, scripts, commands.

This package knows Redis and JSON and nothing else: it never imports engine, worker or producer.
"""
from spool.protocol.defaults import DEFAULT_LIMITS, DEFAULT_PREFIX, Defaults, Limits
from spool.protocol.job import SAMPLING_FIELDS, Job, JobError, Message, parse_entry, parse_job
from spool.protocol.keys import GROUP, Keys, new_id, validate_id
from spool.protocol.priorities import (
    BATCH_PRIORITY, DEFAULT_PRIORITY, PRIORITIES, PRIORITY_RANK, Priority, validate_priority,
)
from spool.protocol.results import (
    PROTOCOL_VERSION, Choice, DeltaData, DoneData, ErrorInfo, RestartData, Result, Timings, TokenEvent,
    TokenLogprob, ToolCall, Usage,
)

__all__ = [
    "BATCH_PRIORITY", "Choice", "DEFAULT_LIMITS", "DEFAULT_PREFIX", "DEFAULT_PRIORITY", "Defaults", "DeltaData",
    "DoneData",
    "ErrorInfo", "GROUP", "Job", "JobError", "Keys", "Limits", "Message", "PRIORITIES", "PRIORITY_RANK",
    "PROTOCOL_VERSION", "Priority", "RestartData", "Result", "SAMPLING_FIELDS", "Timings", "TokenEvent",
    "TokenLogprob", "ToolCall", "Usage", "new_id", "parse_entry", "parse_job", "validate_id", "validate_priority",
]
