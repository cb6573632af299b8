"""Leases on in-flight jobs, reclaiming a dead worker's jobs, and the dead-letter stream.

A job stays in its consumer's pending list until the result and XACK land together. A live worker refreshes
the idle time of its in-flight entries (XCLAIM to itself, JUSTID) so nobody steals a long generation; a dead
worker's entries go idle and any live worker takes them over with XAUTOCLAIM. A job delivered more than
max_deliveries times is a poison job: it goes to the dead-letter stream with a failed result.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from worker.admission import Entry
from worker.outbox import REDIS_ERRORS

if TYPE_CHECKING:
    from worker.loop import Worker

log = logging.getLogger(__name__)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else x


class Leases:
    """Keeps this worker's jobs claimed and takes over jobs whose worker stopped answering."""

    def __init__(self, worker: "Worker"):
        self.w = worker
        self._next_refresh = 0.0
        self._next_reclaim = 0.0  # at start-up: our own (or a dead worker's) pending jobs first

    def maintain(self) -> None:
        """Refresh leases and reclaim idle jobs when their timers are due."""
        now = time.monotonic()
        idle_s = self.w.s.claim_idle_ms / 1000.0
        if now >= self._next_refresh and self.w.inflight:
            self._refresh()
            self._next_refresh = now + idle_s / 4
        if now >= self._next_reclaim and not self.w.stopping:
            self._reclaim()
            self._next_reclaim = now + max(idle_s / 2, 0.05)

    def _refresh(self) -> None:
        by_stream: dict[str, list[str]] = {}
        for inf in self.w.inflight.values():
            by_stream.setdefault(inf.stream, []).append(inf.entry_id)
        try:
            pipe = self.w.r.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xclaim(stream, self.w.keys.group, self.w.s.name, 0, ids, justid=True)
            pipe.execute()
        except REDIS_ERRORS as e:
            log.warning("lease refresh failed: %s", e)

    def _reclaim(self) -> None:
        w = self.w
        cap = w.engine.admission_capacity()
        if cap <= 0:
            return
        for stream in w.keys.all_jobs:
            try:
                resp = w.r.xautoclaim(stream, w.keys.group, w.s.name, w.s.claim_idle_ms, "0-0", count=cap)
            except REDIS_ERRORS as e:
                log.warning("reclaim failed: %s", e)
                return
            msgs = [m for m in resp[1] if m and m[1] is not None]
            ours = {inf.entry_id for inf in w.inflight.values()}
            msgs = [m for m in msgs if _s(m[0]) not in ours]
            if not msgs:
                continue
            counts = self._delivery_counts(stream, [_s(m[0]) for m in msgs])
            entries = []
            for eid, fields in msgs:
                e = Entry(stream, _s(eid), fields, counts.get(_s(eid), 1))
                if e.deliveries > w.s.max_deliveries:
                    self.poison(e)
                else:
                    entries.append(e)
            if entries:
                log.warning("reclaimed %d idle jobs from %s", len(entries), stream)
                w.handle_entries(entries, restart=True)

    def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        pipe = self.w.r.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(stream, self.w.keys.group, min=eid, max=eid, count=1)
        out = {}
        for rows in pipe.execute():
            for row in rows:
                out[_s(row["message_id"])] = int(row["times_delivered"])
        return out

    def poison(self, e: Entry) -> None:
        """A job that keeps killing workers: dead letter plus a failed result, never another run."""
        from worker.admission import parse
        from worker.admission import Rejection

        reason = f"delivered {e.deliveries} times (limit {self.w.s.max_deliveries}); a worker died on every attempt"
        p = parse(e, self.w.keys, self.w.limits)
        rid = p.id if isinstance(p, Rejection) else p[0]
        self.dead_letter(e, reason, rid)
        if rid is not None:
            self.w._reject(Rejection(e, rid, "failed", "poison_job", reason, None if isinstance(p, Rejection) else p[1]))

    def dead_letter(self, e: Entry, reason: str, rid: str | None = None) -> None:
        """Copy an entry to the dead-letter stream with its reason; ack it unless a result write will."""
        w = self.w
        fields = {
            "stream": e.stream,
            "entry_id": e.entry_id,
            "reason": reason,
            "deliveries": str(e.deliveries),
            "id": rid or "",
            "at": f"{time.time():.3f}",
        }
        job = e.fields.get(b"job", e.fields.get("job"))
        if job is not None:
            fields["job"] = job
        flat = [x for kv in fields.items() for x in kv]
        w.outbox.add("XADD", w.keys.dead, "MAXLEN", "~", w.d.dead_maxlen, "*", *flat)
        if rid is None:
            w.outbox.add("XACK", e.stream, w.keys.group, e.entry_id)
        log.warning("dead letter %s/%s: %s", e.stream, e.entry_id, reason)
