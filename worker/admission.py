"""Turning stream entries into engine requests: parse, validate, de-duplicate, honour cancel and deadline."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pydantic import ValidationError

from engine import LLMEngine, SamplingParams
from producer.keys import Keys
from producer.schema import Job, JobError, Limits, parse_entry
from worker.inflight import PRIORITY_RANK, InFlight

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Entry:
    """One jobs-stream entry as read from Redis."""

    stream: str
    entry_id: str
    fields: dict
    deliveries: int = 1

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
    """Validate an entry's job and settle its request id."""
    priority = keys.priority_of(entry.stream)
    try:
        job = parse_entry(entry.fields, limits)
    except JobError as e:
        return Rejection(entry, e.id, "failed", e.code, e.message)
    rid = job.id or keys.default_id(priority, entry.entry_id)
    return rid, job


def check_runnable(entry: Entry, rid: str, job: Job, cancelled: bool, now: float) -> Rejection | None:
    """A cancelled or expired job never starts."""
    if cancelled:
        return Rejection(entry, rid, "cancelled", "cancelled", "cancelled before it started", job)
    if job.deadline is not None and job.deadline < now:
        return Rejection(entry, rid, "expired", "deadline_exceeded",
                         f"deadline {job.deadline:.3f} passed before the job started", job)
    return None


def submit(engine: LLMEngine, entry: Entry, rid: str, job: Job, keys: Keys) -> InFlight | Rejection:
    """Hand a valid job to the engine; prompt rendering or parameter errors become failed results."""
    priority = job.priority or keys.priority_of(entry.stream)
    try:
        if job.messages is not None:
            prompt = engine.apply_chat_template([m.model_dump() for m in job.messages])
        elif job.prompt_token_ids is not None:
            prompt = {"prompt_token_ids": job.prompt_token_ids}
        else:
            prompt = job.prompt
        params = SamplingParams(**job.sampling_kwargs())
        engine.add_request(rid, prompt, params, priority=PRIORITY_RANK[priority])
    except (ValueError, ValidationError, TypeError) as e:
        log.info("job %s rejected: %s", rid, e)
        return Rejection(entry, rid, "failed", "invalid_prompt", str(e).splitlines()[0][:500], job)
    return InFlight(id=rid, job=job, stream=entry.stream, entry_id=entry.entry_id, priority=priority,
                    enqueued=entry.enqueued, started=time.time(), deliveries=entry.deliveries)
