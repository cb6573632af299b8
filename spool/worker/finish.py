"""Finishing a job, the one place it happens: build the Result, write it first-final-wins, ack, dead-letter.

Every way a job can end goes through Finisher: a completed or aborted run (complete), an entry that never
runs (reject: invalid, cancelled before start, expired), a duplicate entry of a job already final or
running (ack), a poison job (poison) and an entry without a usable id (dead_letter). The writes queue on
the Outbox and leave with the step's other writes in one MULTI/EXEC on a single Redis, so a result and its
XACK land together or not at all; on Redis Cluster the XACK follows once the result has landed (spool.worker.outbox).
The compare-and-set inside Redis (spool.protocol.scripts) makes a duplicate run harmless either way.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from spool.protocol import Choice, Defaults, Job, Keys, Result, Timings, TokenEvent, Usage
from spool.protocol.commands import duplicate_id_message
from spool.protocol.scripts import FINALIZE, flat_fields
from spool.worker.admission import Entry, Rejection
from spool.worker.chat import NAMED
from spool.worker.inflight import InFlight, new_run
from spool.worker.outbox import Outbox
from spool.worker.tool_calls import extract, named_call

log = logging.getLogger(__name__)

NOT_STREAMED, STREAMED, STREAM_GAPS = 0, 1, 2  # FINALIZE's stream modes (STREAM_GAPS: replay the output)


def build_result(inf: InFlight, worker: str) -> Result:
    """The final Result document of a job whose last delta has arrived."""
    choices = []
    for i, c in enumerate(inf.choices):
        choice = Choice(index=i, text="".join(c.text), token_ids=c.token_ids, finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason, logprobs=c.logprobs)
        if inf.tool_mode is not None and c.finish_reason in ("stop", "length"):
            _add_tool_calls(choice, inf)
        choices.append(choice)
    return Result(
        id=inf.id,
        status=inf.end_status or "completed",
        choices=choices,
        usage=Usage(prompt_tokens=inf.prompt_tokens, completion_tokens=sum(len(c.token_ids) for c in inf.choices),
                    cached_tokens=inf.cached_tokens),
        error=inf.end_error,
        timings=Timings(enqueued=inf.enqueued, started=inf.started, first_token=inf.first_token,
                        finished=time.time()),
        metadata=inf.job.metadata,
        worker=worker,
    )


def _add_tool_calls(choice: Choice, inf: InFlight) -> None:
    """Parse a choice's text into OpenAI tool calls (finish_reason "tool_calls" as OpenAI reports them)."""
    if inf.tool_mode == NAMED:
        name = inf.job.tool_choice.function.name  # type: ignore[union-attr]
        calls, content = named_call(choice.text, name, inf.id, choice.index), None
    else:
        content, calls = extract(choice.text, inf.tool_mode, inf.tool_parser or "hermes", inf.id, choice.index)
    if calls:
        choice.tool_calls, choice.content = calls, content
        if inf.tool_mode != NAMED and choice.finish_reason == "stop":
            choice.finish_reason = "tool_calls"


class Finisher:
    """Queues every write that ends a job on the Outbox, and counts how the first-final-wins writes went."""

    def __init__(self, outbox: Outbox, keys: Keys, defaults: Defaults, worker_name: str,
                 max_job_bytes: int = 1 << 20):
        self.outbox, self.keys, self.defaults, self.worker_name = outbox, keys, defaults, worker_name
        self.max_job_bytes = max_job_bytes  # dead letters keep at most this much of a document
        self.finals_queued = 0  # final writes handed to the outbox
        self.finals_won = 0  # final results this worker wrote
        self.finals_lost = 0  # final writes suppressed because the request already had a final result

    def complete(self, inf: InFlight) -> None:
        """A run the engine has ended (finished, cancelled, expired or failed): write its result."""
        mode = (STREAM_GAPS if inf.stream_gap else STREAMED) if inf.job.stream else NOT_STREAMED
        self.final(inf.id, build_result(inf, self.worker_name), inf.stream, inf.entry_id,
                   run=inf.run, last_seq=inf.seq, stream_mode=mode)

    def reject(self, rejection: Rejection) -> None:
        """An entry that ends without running: its failed/cancelled/expired result, or a dead letter without id."""
        entry = rejection.entry
        if rejection.id is None:
            # No usable id: nobody can be waiting on a result key, so the entry goes to the dead letters.
            self.dead_letter(entry, f"{rejection.code}: {rejection.message}")
            return
        metadata = rejection.job.metadata if rejection.job is not None else None
        result = Result.failed(rejection.id, rejection.code, rejection.message, status=rejection.status,
                               metadata=metadata, worker=self.worker_name)
        result.timings.enqueued = entry.enqueued
        result.timings.finished = time.time()
        streamed = rejection.job is not None and rejection.job.stream
        self.final(rejection.id, result, entry.stream, entry.entry_id, run=new_run(), last_seq=-1,
                   stream_mode=STREAMED if streamed else NOT_STREAMED)

    def poison(self, entry: Entry, rid: str | None, reason: str, job: Job | None = None) -> None:
        """A job that keeps killing workers: dead letter plus a failed result, never another run."""
        self.dead_letter(entry, reason, rid, ack=rid is None)
        if rid is not None:
            self.reject(Rejection(entry, rid, "failed", "poison_job", reason, job))

    def duplicate(self, entry: Entry, rid: str) -> None:
        """An entry whose id another job document holds (queued, running or final): never run, never merged
        into the other job's result or stream; dead-lettered and acked."""
        self.dead_letter(entry, f"duplicate_id: {duplicate_id_message(rid)}", rid)

    def final(self, rid: str, result: Result, stream: str, entry_id: str, *, run: str, last_seq: int,
              stream_mode: int) -> None:
        """Result, done event, status and quarantine cleanup (first final wins), then the XACK: the step's
        MULTI/EXEC carries them together (spool.protocol.scripts.FINALIZE)."""
        done = TokenEvent.done(result.status, result.finish_reason).to_fields()
        self.finals_queued += 1
        d, k = self.defaults, self.keys
        keep_stream_s = d.stream_done_ttl_s if stream_mode != NOT_STREAMED else d.done_marker_ttl_s
        self.outbox.add_script(
            FINALIZE, [k.result(rid), k.tokens(rid), k.status(rid), k.digest(rid), k.quarantine(rid)],
            [result.to_json(), d.result_ttl_s, d.tokens_maxlen, keep_stream_s, run, last_seq, stream_mode,
             *flat_fields(done)],
            on_reply=lambda reply: self._counted(rid, reply))
        self.ack(stream, entry_id)

    def ack(self, stream: str, entry_id: str) -> None:
        """XACK and XDEL one jobs-stream entry: acked, it leaves the stream, which keeps only the backlog."""
        self.outbox.add("XACK", stream, self.keys.group, entry_id)
        self.outbox.add("XDEL", stream, entry_id)

    def dead_letter(self, entry: Entry, reason: str, rid: str | None = None, ack: bool = True) -> None:
        """Copy an entry to the dead-letter stream with its reason; ack it unless a result write will."""
        fields: dict[str, Any] = {
            "stream": entry.stream,
            "entry_id": entry.entry_id,
            "reason": reason[:2000],
            "deliveries": str(entry.deliveries),
            "id": rid or "",
            "at": f"{time.time():.3f}",
        }
        job = entry.raw
        if job is not None:
            if len(job) > self.max_job_bytes:
                # A hostile 100 MB entry must not be copied whole: it could never run anyway.
                job, fields["job_truncated_from"] = job[:self.max_job_bytes], str(len(job))
            fields["job"] = job
        self.outbox.add("XADD", self.keys.dead, "MAXLEN", "~", self.defaults.dead_maxlen, "*", *flat_fields(fields))
        if ack:
            self.ack(entry.stream, entry.entry_id)
        log.warning("dead letter %s/%s: %s", entry.stream, entry.entry_id, reason[:300])

    def _counted(self, rid: str, reply: object) -> None:
        if reply == 1:
            self.finals_won += 1
        elif reply == 0:
            self.finals_lost += 1
            # Counted apart from FINALIZE: the stats hash is in another hash slot than the request's keys.
            self.outbox.add("HINCRBY", self.keys.stats, "duplicate_finals", 1)
            log.warning("request %s already had a final result; this duplicate run's result was dropped", rid)
