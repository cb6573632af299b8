"""Leases on in-flight jobs, reclaiming a dead worker's jobs, and spotting poison jobs.

A job stays in its consumer's pending list until the result and XACK land together. A live worker refreshes
the idle time of its in-flight entries (XCLAIM to itself, JUSTID) every claim_idle/4, so nobody steals a
long generation; a dead worker's entries go idle and any live worker takes them over with XAUTOCLAIM (a
worker restarted under the same name takes its own back at once). Before refreshing, the worker checks that
each entry is still its own: if it stalled longer than claim_idle (a Redis outage, a frozen host) and
another worker took the job, or the job already has its final result, the local run is dropped quietly.
Entries a worker holds but lost track of through a Redis error are taken back without counting a delivery,
and a worker that stops (warm or cold) releases its unfinished entries with their delivery count unchanged
and their lease expired (release), so the count a job carries is the number of worker deaths around it
(spool.worker.quarantine decides what a high count means).

Leases only talks to Redis and decides; it returns LeaseActions and the worker loop applies them (admit the
takeovers, drop the superseded runs), so this module never reaches into the loop.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from spool.protocol import Keys
from spool.protocol.commands import as_str
from spool.protocol.connection import TRANSIENT_ERRORS
from spool.worker.admission import Entry
from spool.worker.inflight import InFlightTable
from spool.worker.outbox import Backoff, Outbox
from spool.worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def is_nogroup(e: Exception) -> bool:
    """True for the error Redis gives when a stream or its group vanished (a restart without persistence)."""
    return isinstance(e, redis.ResponseError) and "NOGROUP" in str(e)


@dataclass(slots=True)
class LeaseActions:
    """What the worker loop must do after a lease pass."""

    takeovers: list[Entry] = field(default_factory=list)  # jobs to run again (a restart marker goes first)
    supersedes: list[tuple[str, str]] = field(default_factory=list)  # (request id, why): drop our run
    gone: list[tuple[str, str]] = field(default_factory=list)  # (stream, entry id) deleted while pending: ack
    groups_lost: bool = False  # NOGROUP: the consumer groups must be created again


class Leases:
    """Keeps this worker's jobs claimed and finds jobs whose worker stopped answering."""

    def __init__(self, redis_client: redis.Redis, keys: Keys, settings: WorkerSettings, inflight: InFlightTable,
                 gate: Backoff, capacity: Callable[[str], int], outbox: Outbox):
        self.redis, self.keys, self.settings, self.inflight = redis_client, keys, settings, inflight
        self.outbox = outbox
        self.gate = gate  # shared with the worker's reads: one pause for the whole worker while Redis is away
        self.capacity = capacity  # jobs of a stream the engine can admit now
        self._next_refresh = 0.0
        self._next_reclaim = 0.0
        self._cursor: dict[str, str] = {}  # XAUTOCLAIM cursor per stream: walk the whole pending list in turns
        self._after_outage = False

    def maintain(self, *, outbox_healthy: bool, may_reclaim: bool) -> LeaseActions:
        """Refresh leases and look for abandoned jobs when their timers are due."""
        actions = LeaseActions()
        now = time.monotonic()
        idle_s = self.settings.claim_idle_ms / 1000.0
        if self.gate.failing or not outbox_healthy:
            self._after_outage = True
        if self._after_outage and self.gate.ready():
            # Every worker's leases lapsed during the outage, so every pending job looks abandoned now. Re-lease
            # ours at once and hold back reclaiming for claim_idle/2, so that live workers do the same first.
            self._next_refresh = min(self._next_refresh, now)
            self._next_reclaim = max(self._next_reclaim, now + idle_s / 2)
        if now >= self._next_refresh and self.inflight and self.gate.ready():
            self._next_refresh = now + idle_s / 4
            self._guard("lease refresh", self._refresh, actions)
        if self._after_outage and not self.gate.failing and outbox_healthy:
            self._after_outage = False
        if now >= self._next_reclaim and may_reclaim and self.gate.ready():
            # A full engine tries again at the next call, before admission reads new jobs: under a steady
            # backlog, a dead worker's jobs would otherwise wait until a free slot coincides with the timer.
            if max(self.capacity(s) for s in self.keys.all_jobs) > 0:
                self._next_reclaim = now + max(idle_s / 2, 0.05)
                self._guard("reclaim", lambda a: self._reclaim(a, outbox_healthy), actions)
        return actions

    def release(self, stream: str, entry_id: str, deliveries: int) -> None:
        """Hand a pending entry of ours back at once (an operator stop, or a suspect better run elsewhere):
        its lease expires now and its delivery count is restored, so the next taker's delivery is not
        counted as a death."""
        self.outbox.add("XCLAIM", stream, self.keys.group, self.settings.name, 0, entry_id,
                        "IDLE", self.settings.claim_idle_ms, "RETRYCOUNT", max(deliveries - 1, 0), "JUSTID",
                        options={"parse_justid": True})

    def recover_own(self) -> LeaseActions:
        """At start-up: this worker name's pending jobs belonged to a previous process that died; rerun them."""
        actions = LeaseActions()
        for stream in self.keys.all_jobs:
            cap = self.capacity(stream)
            if cap <= 0:
                continue
            resp = self.redis.xreadgroup(self.keys.group, self.settings.name, {stream: "0"}, count=cap)
            msgs = [m for _, batch in resp or [] for m in batch]
            if msgs:
                log.warning("recovering %d jobs left pending by a previous %s", len(msgs), self.settings.name)
                self._take(stream, msgs, actions)
        return actions

    def _guard(self, name: str, fn: Callable[[LeaseActions], None], actions: LeaseActions) -> None:
        try:
            fn(actions)
            self.gate.ok()
        except TRANSIENT_ERRORS as e:
            log.warning("redis unavailable during %s: %s (retry in %.1fs)", name, e, self.gate.fail())
        except redis.ResponseError as e:
            if is_nogroup(e):
                actions.groups_lost = True
            else:
                log.error("redis refused %s: %s", name, e)
                self.gate.fail()

    # -- our own jobs -----------------------------------------------------------------------------
    def _refresh(self, actions: LeaseActions) -> None:
        live = [inf for inf in self.inflight.values() if not inf.superseded]
        if not live:
            return
        group, name = self.keys.group, self.settings.name
        pipe = self.redis.pipeline(transaction=False)
        for inf in live:
            pipe.xpending_range(inf.stream, group, min=inf.entry_id, max=inf.entry_id, count=1)
            pipe.exists(self.keys.result(inf.id))
        replies = pipe.execute(raise_on_error=False)
        mine: dict[str, list[str]] = {}
        for i, inf in enumerate(live):
            rows, has_result = replies[2 * i], replies[2 * i + 1]
            owner = as_str(rows[0]["consumer"]) if isinstance(rows, list) and rows else None
            if has_result is True or has_result == 1:
                actions.supersedes.append((inf.id, "another worker already wrote its final result"))
            elif owner is not None and owner != name:
                actions.supersedes.append((inf.id, f"reclaimed by worker {owner} while this one stalled"))
            elif owner == name:
                mine.setdefault(inf.stream, []).append(inf.entry_id)
            # owner None, no result: Redis lost the entry (restarted without persistence). Finish the job
            # anyway: someone is waiting for its result, and the key does not need the entry.
        if mine:
            pipe = self.redis.pipeline(transaction=False)
            for stream, ids in mine.items():
                pipe.xclaim(stream, group, name, 0, ids, justid=True)
            pipe.execute()

    def _recover_orphans(self, stream: str, cap: int, actions: LeaseActions) -> None:
        """Our own pending entries that we are not running: a read whose reply was lost, an admission cut short
        by a Redis error. Take them back without counting a delivery (XCLAIM JUSTID; XAUTOCLAIM would count
        one), so that a flaky connection never turns a healthy job into a poison job."""
        group, name, idle_ms = self.keys.group, self.settings.name, self.settings.claim_idle_ms
        ours = self.inflight.entry_ids()
        rows = self.redis.xpending_range(stream, group, "-", "+", cap + len(ours), consumername=name, idle=idle_ms)
        counts = {as_str(row["message_id"]): int(row["times_delivered"]) for row in rows}
        ids = [eid for eid in counts if eid not in ours][:cap]
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.xclaim(stream, group, name, idle_ms, ids, justid=True)  # still idle: still ours
        for eid in ids:
            pipe.xrange(stream, eid, eid)
        claimed, *found = pipe.execute()
        claimed = {as_str(x) for x in claimed}
        msgs = [(eid, rows[0][1] if rows else None) for eid, rows in zip(ids, found) if eid in claimed]
        if msgs:
            self._take(stream, msgs, actions, counts)

    # -- other workers' jobs ----------------------------------------------------------------------
    def _reclaim(self, actions: LeaseActions, outbox_healthy: bool) -> None:
        for stream in self.keys.all_jobs:
            cap = self.capacity(stream)
            if cap <= 0:
                continue
            if outbox_healthy:  # else a finished job's XACK may still wait in the outbox: not an orphan
                # First, or XAUTOCLAIM below would count a delivery for them.
                self._recover_orphans(stream, cap, actions)
            cap -= sum(e.stream == stream for e in actions.takeovers)  # taken above, not in the engine yet
            if cap <= 0:
                continue
            start = self._cursor.get(stream, "0-0")
            resp = self.redis.xautoclaim(stream, self.keys.group, self.settings.name, self.settings.claim_idle_ms,
                                         start, count=cap)
            self._cursor[stream] = as_str(resp[0])  # "0-0" once the scan has wrapped around
            if resp[1]:
                self._take(stream, resp[1], actions)

    def _take(self, stream: str, msgs: list, actions: LeaseActions, counts: dict[str, int] | None = None) -> None:
        ours = self.inflight.entry_ids() | {e.entry_id for e in actions.takeovers}
        # Deleted (XDEL / trimmed) while pending: nothing left to run; ack so it stops being reclaimed.
        actions.gone += [(stream, as_str(eid)) for eid, fields in msgs if fields is None]
        msgs = [(as_str(eid), fields) for eid, fields in msgs if fields is not None and as_str(eid) not in ours]
        if not msgs:
            return
        if counts is None:
            counts = self._delivery_counts(stream, [eid for eid, _ in msgs])
        taken = [Entry(stream, eid, fields, counts.get(eid, 1)) for eid, fields in msgs]
        if taken:
            log.warning("took over %d jobs from %s: %s", len(taken), stream, " ".join(e.entry_id for e in taken))
            actions.takeovers += taken

    def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(stream, self.keys.group, min=eid, max=eid, count=1)
        out = {}
        for rows in pipe.execute(raise_on_error=False):
            for row in rows if isinstance(rows, list) else ():
                out[as_str(row["message_id"])] = int(row["times_delivered"])
        return out
