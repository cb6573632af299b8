"""Leases on in-flight jobs, reclaiming a dead worker's jobs, and poison jobs.

A job stays in its consumer's pending list until the result and XACK land together. A live worker refreshes
the idle time of its in-flight entries (XCLAIM to itself, JUSTID) every claim_idle/4, so nobody steals a
long generation; a dead worker's entries go idle and any live worker takes them over with XAUTOCLAIM (a
worker restarted under the same name takes its own back at once). Before refreshing, the worker checks that
each entry is still its own: if it stalled longer than claim_idle (a Redis outage, a frozen host) and
another worker took the job, or the job already has its final result, the local run is dropped quietly.
A job delivered more than max_deliveries times is a poison job: dead letter plus a failed result. Entries
a worker holds but lost track of through a Redis error are taken back without counting a delivery, so only
worker deaths (and the rare reply lost in transit) count towards that limit.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import redis

from worker.admission import Entry, Rejection, as_str, parse
from worker.outbox import REDIS_ERRORS, Backoff

if TYPE_CHECKING:
    from worker.loop import Worker

log = logging.getLogger(__name__)


def is_nogroup(e: Exception) -> bool:
    """True for the error Redis gives when a stream or its group vanished (a restart without persistence)."""
    return isinstance(e, redis.ResponseError) and "NOGROUP" in str(e)


class Leases:
    """Keeps this worker's jobs claimed and takes over jobs whose worker stopped answering."""

    def __init__(self, worker: "Worker", gate: Backoff):
        self.w = worker
        self.gate = gate  # shared with the worker's reads: one pause for the whole worker while Redis is away
        self._next_refresh = 0.0
        self._next_reclaim = 0.0
        self._cursor: dict[str, str] = {}  # XAUTOCLAIM cursor per stream: walk the whole pending list in turns
        self._after_outage = False

    def maintain(self) -> None:
        """Refresh leases and reclaim idle jobs when their timers are due."""
        now = time.monotonic()
        idle_s = self.w.s.claim_idle_ms / 1000.0
        if self.gate.failing or not self.w.outbox.healthy:
            self._after_outage = True
        if self._after_outage and self.gate.ready():
            # Every worker's leases lapsed during the outage, so every pending job looks abandoned now. Re-lease
            # ours at once and hold back reclaiming for claim_idle/2, so that live workers do the same first.
            self._next_refresh = min(self._next_refresh, now)
            self._next_reclaim = max(self._next_reclaim, now + idle_s / 2)
        if now >= self._next_refresh and self.w.inflight and self.gate.ready():
            self._next_refresh = now + idle_s / 4
            self._guard(self._refresh)
        if self._after_outage and not self.gate.failing and self.w.outbox.healthy:
            self._after_outage = False
        if now >= self._next_reclaim and not self.w.stopping and self.gate.ready():
            # A full engine tries again at the next tick, before admission reads new jobs: under a steady
            # backlog, a dead worker's jobs would otherwise wait until a free slot coincides with the timer.
            if self.w.engine.admission_capacity() > 0:  # priority 0: the most any stream could get
                self._next_reclaim = now + max(idle_s / 2, 0.05)
                self._guard(self._reclaim)

    def _guard(self, fn) -> None:
        try:
            fn()
            self.gate.ok()
        except REDIS_ERRORS as e:
            log.warning("redis unavailable during %s: %s (retry in %.1fs)", fn.__name__, e, self.gate.fail())
        except redis.ResponseError as e:
            if is_nogroup(e):
                self.w.ensure_groups()
            else:
                log.error("redis refused %s: %s", fn.__name__, e)
                self.gate.fail()

    # -- our own jobs -----------------------------------------------------------------------------
    def _refresh(self) -> None:
        w = self.w
        live = [inf for inf in w.inflight.values() if not inf.superseded]
        if not live:
            return
        pipe = w.r.pipeline(transaction=False)
        for inf in live:
            pipe.xpending_range(inf.stream, w.keys.group, min=inf.entry_id, max=inf.entry_id, count=1)
            pipe.exists(w.keys.result(inf.id))
        replies = pipe.execute(raise_on_error=False)
        mine: dict[str, list[str]] = {}
        for i, inf in enumerate(live):
            rows, has_result = replies[2 * i], replies[2 * i + 1]
            owner = as_str(rows[0]["consumer"]) if isinstance(rows, list) and rows else None
            if has_result is True or has_result == 1:
                w.supersede(inf.id, "another worker already wrote its final result")
            elif owner is not None and owner != w.s.name:
                w.supersede(inf.id, f"reclaimed by worker {owner} while this one stalled")
            elif owner == w.s.name:
                mine.setdefault(inf.stream, []).append(inf.entry_id)
            # owner None, no result: Redis lost the entry (restarted without persistence). Finish the job
            # anyway: someone is waiting for its result, and the key does not need the entry.
        if mine:
            pipe = w.r.pipeline(transaction=False)
            for stream, ids in mine.items():
                pipe.xclaim(stream, w.keys.group, w.s.name, 0, ids, justid=True)
            pipe.execute()

    def recover_own(self) -> None:
        """At start-up: this worker name's pending jobs belonged to a previous process that died; rerun them."""
        w = self.w
        for stream in w.keys.all_jobs:
            cap = w.capacity(stream)
            if cap <= 0:
                continue
            resp = w.r.xreadgroup(w.keys.group, w.s.name, {stream: "0"}, count=cap)
            msgs = [m for _, batch in resp or [] for m in batch]
            if msgs:
                log.warning("recovering %d jobs left pending by a previous %s", len(msgs), w.s.name)
                self._take(stream, msgs)

    def _recover_orphans(self, stream: str, cap: int) -> None:
        """Our own pending entries that we are not running: a read whose reply was lost, an admission cut short
        by a Redis error. Take them back without counting a delivery (XCLAIM JUSTID; XAUTOCLAIM would count
        one), so that a flaky connection never turns a healthy job into a poison job."""
        w = self.w
        if not w.outbox.healthy:
            return  # a finished job's XACK may still be waiting in the outbox: not an orphan
        ours = {inf.entry_id for inf in w.inflight.values()}
        rows = w.r.xpending_range(stream, w.keys.group, "-", "+", cap + len(ours), consumername=w.s.name,
                                  idle=w.s.claim_idle_ms)
        counts = {as_str(row["message_id"]): int(row["times_delivered"]) for row in rows}
        ids = [eid for eid in counts if eid not in ours][:cap]
        if not ids:
            return
        pipe = w.r.pipeline(transaction=False)
        pipe.xclaim(stream, w.keys.group, w.s.name, w.s.claim_idle_ms, ids, justid=True)  # still idle: still ours
        for eid in ids:
            pipe.xrange(stream, eid, eid)
        claimed, *found = pipe.execute()
        claimed = {as_str(x) for x in claimed}
        msgs = [(eid, rows[0][1] if rows else None) for eid, rows in zip(ids, found) if eid in claimed]
        if msgs:
            self._take(stream, msgs, counts)

    # -- other workers' jobs ----------------------------------------------------------------------
    def _reclaim(self) -> None:
        w = self.w
        for stream in w.keys.all_jobs:
            cap = w.capacity(stream)
            if cap <= 0:
                continue
            self._recover_orphans(stream, cap)  # first, or XAUTOCLAIM below would count a delivery for them
            cap = w.capacity(stream)
            if cap <= 0:
                continue
            start = self._cursor.get(stream, "0-0")
            resp = w.r.xautoclaim(stream, w.keys.group, w.s.name, w.s.claim_idle_ms, start, count=cap)
            self._cursor[stream] = as_str(resp[0])  # "0-0" once the scan has wrapped around
            if resp[1]:
                self._take(stream, resp[1])

    def _take(self, stream: str, msgs: list, counts: dict[str, int] | None = None) -> None:
        w = self.w
        ours = {inf.entry_id for inf in w.inflight.values()}
        gone = [as_str(eid) for eid, fields in msgs if fields is None]
        if gone:
            # Deleted (XDEL / trimmed) while pending: nothing left to run; ack so it stops being reclaimed.
            for eid in gone:
                w.outbox.add("XACK", stream, w.keys.group, eid)
        msgs = [(as_str(eid), fields) for eid, fields in msgs if fields is not None and as_str(eid) not in ours]
        if not msgs:
            return
        if counts is None:
            counts = self._delivery_counts(stream, [eid for eid, _ in msgs])
        entries = []
        for eid, fields in msgs:
            e = Entry(stream, eid, fields, counts.get(eid, 1))
            if e.deliveries > w.s.max_deliveries:
                self.poison(e)
            else:
                entries.append(e)
        if entries:
            log.warning("took over %d jobs from %s: %s", len(entries), stream, " ".join(e.entry_id for e in entries))
            w.handle_entries(entries, restart=True)

    def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        pipe = self.w.r.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(stream, self.w.keys.group, min=eid, max=eid, count=1)
        out = {}
        for rows in pipe.execute(raise_on_error=False):
            for row in rows if isinstance(rows, list) else ():
                out[as_str(row["message_id"])] = int(row["times_delivered"])
        return out

    def poison(self, e: Entry) -> None:
        """A job that keeps killing workers: dead letter plus a failed result, never another run."""
        w = self.w
        reason = f"delivered {e.deliveries} times (limit {w.s.max_deliveries}); a worker died on every attempt"
        p = parse(e, w.keys, w.limits)
        rid = p.id if isinstance(p, Rejection) else p[0]
        w.writer.dead_letter(e, reason, rid)
        if rid is not None:
            job = None if isinstance(p, Rejection) else p[1]
            w.writer.reject(Rejection(e, rid, "failed", "poison_job", reason, job))
