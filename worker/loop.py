"""The worker: drain Redis streams into the engine, one engine step at a time, and write results back.

Redis holds the backlog: the worker reads only as many jobs as the engine can admit now. Each step's writes
(token deltas, results, acks) go out in one MULTI/EXEC through the Outbox, so a result and the ack of its
job land together or not at all; a job whose worker dies stays pending and is reclaimed (worker.leases).
"""
from __future__ import annotations

import logging
import signal
import time

import orjson
import redis

from engine import LLMEngine
from producer.defaults import Defaults
from producer.keys import Keys
from producer.results import ErrorInfo, Result, TokenEvent
from producer.schema import Limits
from worker.admission import Entry, Rejection, check_runnable, parse, submit
from worker.inflight import InFlight
from worker.leases import Leases
from worker.outbox import REDIS_ERRORS, Outbox
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else x


class Worker:
    """A long-lived consumer of the jobs streams around one LLMEngine."""

    def __init__(self, engine: LLMEngine, client: redis.Redis, settings: WorkerSettings,
                 limits: Limits | None = None, defaults: Defaults | None = None):
        self.engine = engine
        self.r = client
        self.s = settings
        self.keys = Keys(settings.prefix)
        self.limits = limits or Limits.from_env()
        self.d = defaults or Defaults.from_env()
        self.outbox = Outbox(client)
        self.leases = Leases(self)
        self.inflight: dict[str, InFlight] = {}
        self.stopping = False
        self.jobs_done = 0
        self.started = time.time()
        self._next_heartbeat = 0.0
        self._cancels_last = "$"

    # -- lifecycle --------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        """Stop reading new jobs; finish in-flight ones within the grace period."""
        if not self.stopping:
            log.info("stop requested: finishing %d in-flight jobs (grace %.0fs)", len(self.inflight), self.s.grace_period_s)
        self.stopping = True

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start a graceful stop."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        """Serve until stopped (or max_jobs done); returns the process exit code."""
        self._ensure_groups()
        self._init_cancels_cursor()
        log.info("worker %s serving %s", self.s.name, ", ".join(self.keys.all_jobs))
        stop_deadline = None
        while True:
            if self.stopping and stop_deadline is None:
                stop_deadline = time.monotonic() + self.s.grace_period_s
            if self.stopping and (not self.inflight or time.monotonic() > stop_deadline):
                break
            if self.s.max_jobs is not None and self.jobs_done >= self.s.max_jobs and not self.inflight:
                break
            self.tick()
        self._leave()
        return 0

    def tick(self) -> None:
        """One iteration: admit, honour cancels and deadlines, step the engine, publish."""
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._heartbeat()
            self._next_heartbeat = now + self.s.heartbeat_s
        self.leases.maintain()
        if not self.stopping:
            self._admit()
        self._poll_cancels()
        self._expire_deadlines()
        if self.engine.has_unfinished_requests():
            self._publish(self.engine.step())
        self.outbox.flush()

    def _leave(self) -> None:
        for rid in list(self.inflight):
            # Unfinished at the end of the grace period: stays pending in Redis for another worker.
            self.engine.abort(rid)
            del self.inflight[rid]
        while self.engine.has_unfinished_requests():
            self.engine.step()
        self.outbox.add("SREM", self.keys.workers, self.s.name)
        self.outbox.add("DEL", self.keys.worker(self.s.name))
        self.outbox.flush()
        log.info("worker %s stopped after %d jobs", self.s.name, self.jobs_done)

    # -- reading ----------------------------------------------------------------------------------
    def _ensure_groups(self) -> None:
        for stream in self.keys.all_jobs:
            try:
                # Start at 0: jobs XADDed before any worker existed are served too.
                self.r.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def _admit(self) -> None:
        cap = self.engine.admission_capacity()
        if self.s.max_jobs is not None:
            cap = min(cap, self.s.max_jobs - self.jobs_done - len(self.inflight))
        if cap <= 0 or not self.outbox.healthy:
            return
        idle = not self.engine.has_unfinished_requests() and not self.inflight
        try:
            if idle:
                # Nothing to compute: block until a job arrives, on every priority at once.
                resp = self.r.xreadgroup(self.keys.group, self.s.name, {s: ">" for s in self.keys.all_jobs},
                                         count=cap, block=self.s.block_ms)
            else:
                resp = []
                for stream in self.keys.all_jobs:  # interactive first, bulk gets what is left
                    got = self.r.xreadgroup(self.keys.group, self.s.name, {stream: ">"}, count=cap)
                    resp.extend(got or [])
                    cap -= sum(len(msgs) for _, msgs in got or [])
                    if cap <= 0:
                        break
        except REDIS_ERRORS as e:
            log.warning("redis read failed: %s", e)
            time.sleep(0.2)
            return
        entries = [Entry(_s(stream), _s(eid), fields or {}) for stream, msgs in resp or [] for eid, fields in msgs]
        entries.sort(key=lambda e: self.keys.all_jobs.index(e.stream))
        self.handle_entries(entries)

    def handle_entries(self, entries: list[Entry], restart: bool = False) -> None:
        """Validate and admit entries (new or reclaimed); everything that cannot run gets its result now."""
        parsed: list[tuple[Entry, str, object]] = []
        for e in entries:
            p = parse(e, self.keys, self.limits)
            if isinstance(p, Rejection):
                self._reject(p)
            else:
                parsed.append((e, p[0], p[1]))
        if not parsed:
            return
        try:
            pipe = self.r.pipeline(transaction=False)
            for _, rid, _ in parsed:
                pipe.exists(self.keys.result(rid))
                pipe.exists(self.keys.cancel(rid))
            flags = pipe.execute()
        except REDIS_ERRORS as e:
            log.warning("redis unavailable while admitting (%s); jobs stay pending", e)
            return
        now = time.time()
        for i, (e, rid, job) in enumerate(parsed):
            has_result, cancelled = flags[2 * i], flags[2 * i + 1]
            if has_result or rid in self.inflight:
                # Final already (or running here): a duplicate id or a redelivery must not overwrite it.
                log.info("job %s already final or in flight; acking duplicate entry %s", rid, e.entry_id)
                self.outbox.add("XACK", e.stream, self.keys.group, e.entry_id)
                continue
            rej = check_runnable(e, rid, job, bool(cancelled), now)
            res = rej or submit(self.engine, e, rid, job, self.keys)
            if isinstance(res, Rejection):
                self._reject(res)
                continue
            self.inflight[rid] = res
            self.outbox.add("SET", self.keys.status(rid), "running", "EX", self.d.status_ttl_s)
            if restart:
                self._xadd_event(rid, TokenEvent.restart("job reclaimed from a worker that stopped"))

    # -- writing ----------------------------------------------------------------------------------
    def _xadd_event(self, rid: str, ev: TokenEvent, droppable: bool = False) -> None:
        key = self.keys.tokens(rid)
        self.outbox.add("XADD", key, "MAXLEN", "~", self.d.tokens_maxlen, "*", *_flat(ev.to_fields()),
                        droppable=droppable)
        self.outbox.add("EXPIRE", key, self.d.tokens_ttl_s, droppable=droppable)

    def _publish(self, deltas) -> None:
        for d in deltas:
            inf = self.inflight.get(d.request_id)
            if inf is None:
                continue
            inf.apply(d)
            if inf.job.stream and (d.new_text or d.new_token_ids):
                self._xadd_event(d.request_id, TokenEvent.delta(d.index, d.new_text, d.new_token_ids),
                                 droppable=True)
            if inf.finished:
                self._finish(inf)

    def _finish(self, inf: InFlight) -> None:
        del self.inflight[inf.id]
        self._write_final(inf.id, inf.result(self.s.name), inf.stream, inf.entry_id)

    def _reject(self, rej: Rejection) -> None:
        e = rej.entry
        if rej.id is None:
            # No usable id: nobody can be waiting on a result key, so the entry goes to the dead letters.
            self.leases.dead_letter(e, f"{rej.code}: {rej.message}")
            return
        meta = rej.job.metadata if rej.job is not None else None
        res = Result.failed(rej.id, rej.code, rej.message, status=rej.status, metadata=meta, worker=self.s.name)
        res.timings.enqueued = e.enqueued
        res.timings.finished = time.time()
        self._write_final(rej.id, res, e.stream, e.entry_id)

    def _write_final(self, rid: str, res: Result, stream: str, entry_id: str) -> None:
        """Result, done marker, status cleanup and XACK: queued together, so one MULTI/EXEC carries them."""
        self.outbox.add("SET", self.keys.result(rid), res.to_json(), "EX", self.d.result_ttl_s)
        self._xadd_event(rid, TokenEvent.done(res.status, res.finish_reason))
        self.outbox.add("DEL", self.keys.status(rid))
        self.outbox.add("XACK", stream, self.keys.group, entry_id)
        self.jobs_done += 1

    # -- control ----------------------------------------------------------------------------------
    def _init_cancels_cursor(self) -> None:
        try:
            last = self.r.xrevrange(self.keys.cancels, count=1)
            self._cancels_last = _s(last[0][0]) if last else "0-0"
        except REDIS_ERRORS:
            self._cancels_last = "0-0"

    def _poll_cancels(self) -> None:
        if not self.inflight:
            return
        try:
            resp = self.r.xread({self.keys.cancels: self._cancels_last}, count=1000)
        except REDIS_ERRORS:
            return
        for _, msgs in resp or []:
            for eid, fields in msgs:
                self._cancels_last = _s(eid)
                rid = _s(fields.get(b"id", fields.get("id", b"")))
                self.end_early(rid, "cancelled", "cancelled", "cancelled by request")

    def _expire_deadlines(self) -> None:
        now = time.time()
        for inf in list(self.inflight.values()):
            if inf.job.deadline is not None and inf.job.deadline < now and inf.end_status is None:
                self.end_early(inf.id, "expired", "deadline_exceeded", "deadline passed while running")

    def end_early(self, rid: str, status: str, code: str, message: str) -> None:
        """Abort a running request; its result (with partial text) is written when the engine reports the abort."""
        inf = self.inflight.get(rid)
        if inf is None or inf.end_status is not None:
            return
        inf.end_status, inf.end_error = status, ErrorInfo(code=code, message=message)
        self.engine.abort(rid)

    def _heartbeat(self) -> None:
        info = {
            "name": self.s.name,
            "model": self.engine.config.model,
            "started": self.started,
            "last_seen": time.time(),
            "in_flight": len(self.inflight),
            "kv_usage": round(self.engine.kv_cache_usage(), 4),
            "jobs_done": self.jobs_done,
            "steps": self.engine.stats.num_steps,
            "generated_tokens": self.engine.stats.generation_tokens,
        }
        key = self.keys.worker(self.s.name)
        self.outbox.add("HSET", key, *_flat({k: orjson.dumps(v) for k, v in info.items()}), droppable=True)
        self.outbox.add("EXPIRE", key, self.d.worker_ttl_s, droppable=True)
        self.outbox.add("SADD", self.keys.workers, self.s.name, droppable=True)


def _flat(mapping: dict) -> list:
    out = []
    for k, v in mapping.items():
        out += [k, v]
    return out
