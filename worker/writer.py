"""Everything the worker writes to Redis, queued on the Outbox: token events, final results, dead letters."""
from __future__ import annotations

import logging
import time

from producer.defaults import Defaults
from producer.keys import Keys
from producer.results import Result, TokenEvent
from worker.admission import Entry, Rejection
from worker.finals import append_unless_final_cmd, finalize_cmd, flat_fields
from worker.outbox import Outbox

log = logging.getLogger(__name__)


class Writer:
    """Builds the worker's Redis writes; a step's writes leave together when the Outbox flushes."""

    def __init__(self, outbox: Outbox, keys: Keys, defaults: Defaults, name: str, max_job_bytes: int = 1 << 20):
        self.outbox, self.keys, self.d, self.name = outbox, keys, defaults, name
        self.max_job_bytes = max_job_bytes  # dead letters keep at most this much of a document
        self.finals_queued = 0  # final writes handed to the outbox
        self.finals_won = 0  # final results this worker wrote
        self.finals_lost = 0  # final writes suppressed because the request already had a final result

    def delta(self, rid: str, ev: TokenEvent) -> None:
        """A live token delta: droppable, shed first when Redis stays away."""
        key = self.keys.tokens(rid)
        self.outbox.add("XADD", key, "MAXLEN", "~", self.d.tokens_maxlen, "*", *flat_fields(ev.to_fields()), droppable=True)
        self.outbox.add("EXPIRE", key, self.d.tokens_ttl_s, droppable=True)

    def restart(self, rid: str, reason: str) -> None:
        """Tell tailers to drop partial output; skipped inside Redis once the request is final."""
        self.outbox.add(*append_unless_final_cmd(self.keys.result(rid), self.keys.tokens(rid), self.d.tokens_maxlen,
                                                 self.d.tokens_ttl_s, TokenEvent.restart(reason).to_fields()))

    def final(self, rid: str, res: Result, stream: str, entry_id: str) -> None:
        """Result, done entry and status cleanup (first final wins), plus the XACK: one MULTI/EXEC carries them."""
        done = TokenEvent.done(res.status, res.finish_reason).to_fields()
        self.finals_queued += 1
        self.outbox.add(*finalize_cmd(self.keys.result(rid), self.keys.tokens(rid), self.keys.status(rid),
                                      self.keys.stats, res.to_json(), self.d.result_ttl_s, self.d.tokens_maxlen,
                                      self.d.tokens_ttl_s, done),
                        on_reply=lambda reply: self._counted(rid, reply))
        self.outbox.add("XACK", stream, self.keys.group, entry_id)
        self.outbox.add("XDEL", stream, entry_id)  # acked: the stream keeps only the backlog

    def _counted(self, rid: str, reply: object) -> None:
        if reply == 1:
            self.finals_won += 1
        elif reply == 0:
            self.finals_lost += 1
            log.warning("request %s already had a final result; this duplicate run's result was dropped", rid)

    def reject(self, rej: Rejection) -> None:
        """An entry that ends without running: its failed/cancelled/expired result, or a dead letter without id."""
        e = rej.entry
        if rej.id is None:
            # No usable id: nobody can be waiting on a result key, so the entry goes to the dead letters.
            self.dead_letter(e, f"{rej.code}: {rej.message}")
            return
        meta = rej.job.metadata if rej.job is not None else None
        res = Result.failed(rej.id, rej.code, rej.message, status=rej.status, metadata=meta, worker=self.name)
        res.timings.enqueued = e.enqueued
        res.timings.finished = time.time()
        self.final(rej.id, res, e.stream, e.entry_id)

    def dead_letter(self, e: Entry, reason: str, rid: str | None = None) -> None:
        """Copy an entry to the dead-letter stream with its reason; ack it unless a result write will."""
        fields = {
            "stream": e.stream,
            "entry_id": e.entry_id,
            "reason": reason[:2000],
            "deliveries": str(e.deliveries),
            "id": rid or "",
            "at": f"{time.time():.3f}",
        }
        job = e.fields.get(b"job", e.fields.get("job"))
        if job is not None:
            if len(job) > self.max_job_bytes:
                # A hostile 100 MB entry must not be copied whole: it could never run anyway.
                job, fields["job_truncated_from"] = job[:self.max_job_bytes], str(len(job))
            fields["job"] = job
        self.outbox.add("XADD", self.keys.dead, "MAXLEN", "~", self.d.dead_maxlen, "*", *flat_fields(fields))
        if rid is None:
            self.outbox.add("XACK", e.stream, self.keys.group, e.entry_id)
            self.outbox.add("XDEL", e.stream, e.entry_id)  # acked: the stream keeps only the backlog
        log.warning("dead letter %s/%s: %s", e.stream, e.entry_id, reason[:300])
