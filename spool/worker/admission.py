"""Turning stream entries into engine requests: parse, validate, de-duplicate, honour cancel and deadline."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson
import redis
from pydantic import ValidationError

try:  # a chat template that refuses its input (raise_exception) raises jinja2's TemplateError
    from jinja2 import TemplateError
except ImportError:  # pragma: no cover - transformers brings jinja2
    TemplateError = ValueError  # type: ignore[misc,assignment]

from spool.engine import LLMEngine, SamplingParams, StructuredOutputsParams
from spool.protocol import PRIORITY_RANK, Defaults, Job, JobError, Keys, Limits, parse_entry
from spool.protocol.commands import as_str, entry_field
from spool.protocol.connection import is_cluster
from spool.protocol.scripts import ADMIT, digest
from spool.worker.chat import constraint_of, prompt_of, tool_mode
from spool.worker.inflight import InFlight
from spool.worker.quarantine import Record
from spool.worker.tool_calls import parser_for

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Entry:
    """One jobs-stream entry as read from Redis."""

    stream: str
    entry_id: str
    fields: dict
    deliveries: int = 1

    @property
    def raw(self) -> bytes | None:
        """The job document's bytes (None when the entry has no job field)."""
        raw = entry_field(self.fields, "job")
        return raw.encode() if isinstance(raw, str) else raw

    @property
    def enqueued(self) -> float | None:
        """The entry id's millisecond timestamp, as epoch seconds."""
        try:
            return int(self.entry_id.split("-", 1)[0]) / 1000.0
        except ValueError:
            return None


@dataclass(slots=True)
class Rejection:
    """An entry that ends without running: a failed / cancelled / expired result, or a dead letter when no id."""

    entry: Entry
    id: str | None
    status: str
    code: str
    message: str
    job: Job | None = None


def parse(entry: Entry, keys: Keys, limits: Limits) -> tuple[str, Job] | Rejection:
    """Validate an entry's job and settle its request id (a Rejection carries the id when one is known)."""
    priority = keys.priority_of(entry.stream)
    try:
        job = parse_entry(entry.fields, limits)
        rid = job.id or keys.default_id_of(entry.stream, entry.entry_id)
    except JobError as e:
        rid = e.id if e.id is not None else _default_id_of_invalid(entry, keys, priority, limits)
        return Rejection(entry, rid, "failed", e.code, e.message)
    except Exception as e:  # noqa: BLE001 - no input, however malformed, may take the worker down
        log.exception("unexpected error parsing entry %s/%s", entry.stream, entry.entry_id)
        return Rejection(entry, None, "failed", "internal_error", f"{type(e).__name__}: {e}"[:500])
    return rid, job


def _default_id_of_invalid(entry: Entry, keys: Keys, priority: str, limits: Limits) -> str | None:
    """An invalid JSON object without an id (or with "id": null) still has a request id: its entry id, the one
    its producer waits on, as for a valid job. Other documents without a usable id go to the dead letters."""
    raw = entry_field(entry.fields, "job")
    if raw is None or len(raw) > 64 * limits.max_job_bytes:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and obj.get("id") is None:
        return keys.default_id_of(entry.stream, entry.entry_id)
    return None


@dataclass(slots=True)
class AdmitCheck:
    """What Redis says about an entry's id before the worker runs it (spool.protocol.scripts.ADMIT)."""

    same_document: bool  # False: another job document holds this id (duplicate_id)
    has_result: bool
    cancelled: bool
    quarantine: Record


def admit_checks(redis_client: redis.Redis, keys: Keys, defaults: Defaults,
                 items: list[tuple[str, bytes]]) -> list[AdmitCheck]:
    """One round trip: ADMIT for each (request id, job document bytes); raises the transient Redis errors."""
    cluster = is_cluster(redis_client)
    with redis_client.pipeline(transaction=False) as pipe:
        if not cluster:  # one SCRIPT LOAD, then EVALSHA; a cluster pipeline cannot send SCRIPT LOAD to every node
            pipe.execute_command("SCRIPT", "LOAD", ADMIT.text)  # Redis may have restarted since the last call
        for rid, raw in items:
            keys_, argv = [keys.digest(rid), keys.result(rid), keys.cancel(rid), keys.quarantine(rid)], \
                [digest(raw), defaults.result_ttl_s]
            _, args, _ = ADMIT.eval_cmd(keys_, argv) if cluster else (None, ADMIT.args(keys_, argv), None)
            pipe.execute_command(*args)
        replies = pipe.execute()[0 if cluster else 1:]
    return [AdmitCheck(bool(same), bool(has_result), bool(cancelled),
                       Record(as_str(runner) if runner else None, int(deaths), as_str(died_on) if died_on else None))
            for same, has_result, cancelled, runner, deaths, died_on in replies]


def check_runnable(entry: Entry, rid: str, job: Job, cancelled: bool, now: float) -> Rejection | None:
    """A cancelled or expired job never starts."""
    if cancelled:
        return Rejection(entry, rid, "cancelled", "cancelled", "cancelled before it started", job)
    if job.deadline is not None and job.deadline < now:
        return Rejection(entry, rid, "expired", "deadline_exceeded",
                         f"deadline {job.deadline:.3f} passed before the job started", job)
    return None


def submit(engine: LLMEngine, entry: Entry, rid: str, job: Job, keys: Keys, limits: Limits,
           quarantined: bool = False, tool_parser: str = "auto") -> InFlight | Rejection:
    """Hand a valid job to the engine (alone in its steps if quarantined); prompt rendering or parameter
    errors become failed results."""
    priority = job.priority or keys.priority_of(entry.stream)
    try:
        text, ids = engine.encode_prompt(prompt_of(engine, job))
        kwargs = job.sampling_kwargs()
        if kwargs["max_tokens"] is None:  # OpenAI's default: the rest of the context, within the deployment's cap
            room = engine.max_model_len - len(ids)
            if room < 1:
                raise ValueError(f"the prompt ({len(ids)} tokens) fills the model's context ({engine.max_model_len})")
            kwargs["max_tokens"] = max(min(room, limits.max_tokens), kwargs["min_tokens"], 1)
        constraint = constraint_of(job)
        if constraint is not None:
            kwargs["structured_outputs"] = StructuredOutputsParams(**constraint)
        params = SamplingParams(**kwargs)
        engine.add_request(rid, {"prompt": text, "prompt_token_ids": ids}, params, priority=PRIORITY_RANK[priority],
                           isolated=quarantined)
    except (ValueError, ValidationError, TypeError, TemplateError) as e:
        log.info("job %s rejected: %s", rid, e)
        return Rejection(entry, rid, "failed", "invalid_prompt", (str(e).splitlines() or [""])[0][:500], job)
    except Exception as e:  # noqa: BLE001 - e.g. a tokenizer or chat template error on odd input
        log.exception("job %s could not be submitted", rid)
        return Rejection(entry, rid, "failed", "internal_error", f"{type(e).__name__}: {e}"[:500], job)
    mode = tool_mode(job)
    return InFlight(id=rid, job=job, stream=entry.stream, entry_id=entry.entry_id, priority=priority,
                    enqueued=entry.enqueued, started=time.time(), deliveries=entry.deliveries,
                    quarantined=quarantined, tool_mode=mode,
                    tool_parser=parser_for(getattr(engine.tokenizer, "chat_template", None), tool_parser)
                    if mode else None)
