"""The worker: drain Redis streams into the engine, one engine step at a time, and write results back.

Redis holds the backlog: the worker reads only as many jobs as the engine can admit now. Each step's writes
(token deltas, results, acks) go out in one MULTI/EXEC through the Outbox, so a result and the ack of its
job land together or not at all; a job whose worker dies stays pending and is reclaimed (worker.leases).

While Redis is away the engine keeps stepping: reads are skipped under a capped backoff, writes wait in the
Outbox, and everything finished meanwhile is written once Redis answers again.
"""
from __future__ import annotations

import logging
import signal
import time

import orjson
import redis

from engine import LLMEngine
from producer.defaults import Defaults
from producer.keys import Keys, validate_id
from producer.results import ErrorInfo, TokenEvent
from producer.schema import Limits
from worker.admission import Entry, Rejection, as_str, check_runnable, parse, submit
from worker.inflight import PRIORITY_RANK, InFlight
from worker.leases import Leases, is_nogroup
from worker.outbox import REDIS_ERRORS, Backoff, Outbox
from worker.settings import WorkerSettings
from worker.writer import Writer

log = logging.getLogger(__name__)


class Worker:
    """A long-lived consumer of the jobs streams around one LLMEngine."""

    def __init__(self, engine: LLMEngine, client: redis.Redis, settings: WorkerSettings,
                 limits: Limits | None = None, defaults: Defaults | None = None):
        self.engine = engine
        self.r = client
        self.s = settings
        self.keys = Keys(settings.prefix)
        validate_id(settings.name, "worker name")  # it keys the heartbeat and names the consumer: fail at start
        self.limits = limits or Limits.from_env()
        self.d = defaults or Defaults.from_env()
        # Pauses after Redis failures stay well under claim_idle, so that when Redis comes back this worker
        # re-leases its jobs before other workers take them for abandoned.
        lease_s = max(0.1, settings.claim_idle_ms / 4000)
        self.outbox = Outbox(client, backoff=Backoff(cap_s=min(5.0, lease_s)))
        self.writer = Writer(self.outbox, self.keys, self.d, settings.name, self.limits.max_job_bytes)
        self.gate = Backoff(cap_s=min(2.0, lease_s))  # reads: paused together while Redis does not answer
        self.leases = Leases(self, self.gate)
        self.inflight: dict[str, InFlight] = {}
        self.stopping = False
        self._ready: list = []  # the last collected step's deltas, published during the next step
        self.started = time.time()
        self._next_heartbeat = 0.0
        self._cancels_last = "$"
        self._groups_ok = False

    @property
    def jobs_done(self) -> int:
        """Final results this worker has queued (completed, failed, cancelled or expired)."""
        return self.writer.finals_queued

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

    def start(self) -> bool:
        """Create the groups and take back this name's pending jobs, waiting for Redis if it is away; False if
        stopped meanwhile."""
        while not self.stopping:
            try:
                self.ensure_groups(strict=True)
                self._init_cancels_cursor()
                self.leases.recover_own()
                return True
            except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as e:
                raise SystemExit(f"spool worker: Redis refused our credentials: {e}") from None
            except (*REDIS_ERRORS, redis.ResponseError) as e:
                pause = self.gate.fail()
                log.warning("redis not ready at start-up (%s); retry in %.1fs", e, pause)
                time.sleep(pause)
        return False

    def run(self) -> int:
        """Serve until stopped (or max_jobs done); returns the process exit code."""
        if not self.start():
            return 0
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
        """One iteration: launch an engine step, talk to Redis while the device computes it, then collect it.

        Everything that waits on Redis (publishing the previous step's tokens, heartbeat, leases, reading
        jobs and cancels) runs between launch and collect, so on a GPU the round trips hide behind the
        forward pass instead of adding to it. Jobs admitted and aborts made meanwhile take effect next step.
        The one exception is a short read of the interactive stream just before the launch.
        """
        busy = self.engine.has_unfinished_requests()
        interactive, lower = self.keys.all_jobs[:1], self.keys.all_jobs[1:]
        if busy and not self.stopping:
            # One small read right before the launch: an interactive job that arrived during the last step
            # starts in this one, instead of waiting in Redis for the whole step. Bulk waits for the read below.
            self._admit(idle=False, streams=interactive)
        step = self.engine.launch() if busy else None
        self._publish(self._ready)
        self._ready = []
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._heartbeat()
            self._next_heartbeat = now + self.s.heartbeat_s
        self.leases.maintain()
        if not self.stopping:
            # Busy: the interactive stream was just read; idle: block on every stream.
            self._admit(idle=step is None, streams=lower if busy else None)
        self._poll_cancels()
        self._expire_deadlines()
        self.outbox.flush()
        if step is not None:
            self._ready = self.engine.collect(step)
        elif self.gate.failing or not self.outbox.healthy:
            time.sleep(0.05)  # Redis is away and there is nothing to compute: don't spin

    def _leave(self) -> None:
        for rid, inf in list(self.inflight.items()):
            # Unfinished at the end of the grace period: stays pending in Redis for another worker.
            inf.superseded = True
            self.engine.abort(rid)
        self._publish(self._ready)
        self._ready = []
        while self.engine.has_unfinished_requests():
            self._publish(self.engine.step())
        self.outbox.add("SREM", self.keys.workers, self.s.name)
        self.outbox.add("DEL", self.keys.worker(self.s.name))
        # Results finished during an outage are still in the outbox: give Redis a little time to come back.
        give_up = time.monotonic() + min(self.s.grace_period_s, 10.0)
        while not self.outbox.flush() and time.monotonic() < give_up:
            time.sleep(0.1)
        if len(self.outbox):
            log.error("redis unavailable at exit: %d writes lost (their jobs stay pending and will be rerun)",
                      len(self.outbox))
        log.info("worker %s stopped after %d jobs", self.s.name, self.jobs_done)

    # -- reading ----------------------------------------------------------------------------------
    def ensure_groups(self, strict: bool = False) -> None:
        """Create the consumer group on every jobs stream (again after a Redis restart that lost them)."""
        try:
            for stream in self.keys.all_jobs:
                try:
                    # Start at 0: jobs XADDed before any worker existed are served too.
                    self.r.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
                    if self._groups_ok:
                        log.warning("consumer group on %s was gone (Redis restarted without persistence?); "
                                    "recreated", stream)
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
            self._groups_ok = True
        except (*REDIS_ERRORS, redis.ResponseError) as e:
            if strict:
                raise
            log.warning("could not create consumer groups: %s (retry in %.1fs)", e, self.gate.fail())

    def _read(self, streams: dict[str, str], count: int, block: int | None = None) -> list:
        try:
            resp = self.r.xreadgroup(self.keys.group, self.s.name, streams, count=count, block=block)
            self.gate.ok()
            return resp or []
        except REDIS_ERRORS as e:
            log.warning("redis read failed: %s (retry in %.1fs)", e, self.gate.fail())
        except redis.ResponseError as e:
            if is_nogroup(e):
                self.ensure_groups()
            else:
                log.error("redis refused XREADGROUP: %s", e)
                self.gate.fail()
        return []

    def capacity(self, stream: str) -> int:
        """How many jobs of this stream's priority to read now (running bulk yields to interactive, not to bulk)."""
        cap = self.engine.admission_capacity(PRIORITY_RANK[self.keys.priority_of(stream)])
        if self.s.max_jobs is not None:
            cap = min(cap, self.s.max_jobs - self.jobs_done - len(self.inflight))
        return cap

    def _admit(self, idle: bool, streams: list[str] | None = None) -> None:
        """Read what the engine can admit now: all streams, interactive first, or only `streams`."""
        if not self.outbox.healthy or not self.gate.ready():
            return
        if idle and not self.inflight:
            # Nothing to compute: send what is queued, then block until a job arrives, on every priority.
            if not self.outbox.flush():
                return
            cap = self.capacity(self.keys.jobs())
            resp = self._read({s: ">" for s in self.keys.all_jobs}, cap, self.s.block_ms) if cap > 0 else []
        else:
            resp, taken = [], 0
            for stream in self.keys.all_jobs if streams is None else streams:  # interactive first, then bulk
                cap = self.capacity(stream) - taken  # entries read above are not in the engine yet
                if cap <= 0:
                    continue
                got = self._read({stream: ">"}, cap)
                resp.extend(got)
                taken += sum(len(msgs) for _, msgs in got)
                if self.gate.failing:
                    break
        entries = [Entry(as_str(stream), as_str(eid), fields or {}) for stream, msgs in resp for eid, fields in msgs]
        entries.sort(key=lambda e: self.keys.all_jobs.index(e.stream))
        self.handle_entries(entries)

    def handle_entries(self, entries: list[Entry], restart: bool = False) -> None:
        """Validate and admit entries (new or reclaimed); everything that cannot run gets its result now."""
        parsed: list[tuple[Entry, str, object]] = []
        for e in entries:
            p = parse(e, self.keys, self.limits)
            if isinstance(p, Rejection):
                self.writer.reject(p)
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
            # Already delivered to us: they stay pending and come back through a reclaim.
            log.warning("redis unavailable while admitting (%s); jobs stay pending (retry in %.1fs)",
                        e, self.gate.fail())
            return
        now = time.time()
        for i, (e, rid, job) in enumerate(parsed):
            has_result, cancelled = flags[2 * i], flags[2 * i + 1]
            running = self.inflight.get(rid)
            if running is not None and running.superseded:
                continue  # our run of this id is being dropped: leave the entry pending for a later reclaim
            if has_result or running is not None:
                # Final already (or running here): a duplicate id or a redelivery must not overwrite it.
                log.info("job %s already final or in flight; acking duplicate entry %s", rid, e.entry_id)
                self.outbox.add("XACK", e.stream, self.keys.group, e.entry_id)
                self.outbox.add("XDEL", e.stream, e.entry_id)  # acked: the stream keeps only the backlog
                continue
            rej = check_runnable(e, rid, job, bool(cancelled), now)
            res = rej or submit(self.engine, e, rid, job, self.keys)
            if isinstance(res, Rejection):
                self.writer.reject(res)
                continue
            self.inflight[rid] = res
            self.outbox.add("SET", self.keys.status(rid), "running", "EX", self.d.status_ttl_s)
            if restart:
                self.writer.restart(rid, "job reclaimed from a worker that stopped")

    # -- writing ----------------------------------------------------------------------------------
    def _publish(self, deltas) -> None:
        for d in deltas:
            inf = self.inflight.get(d.request_id)
            if inf is None:
                continue
            inf.apply(d)
            if inf.job.stream and not inf.superseded and (d.new_text or d.new_token_ids):
                self.writer.delta(d.request_id, TokenEvent.delta(d.index, d.new_text, d.new_token_ids))
            if d.finished and inf.finished:  # only a finishing delta can complete the request
                del self.inflight[inf.id]
                if not inf.superseded:
                    self.writer.final(inf.id, inf.result(self.s.name), inf.stream, inf.entry_id)

    def supersede(self, rid: str, why: str) -> None:
        """Drop our run of `rid` without writing anything: another worker owns or finished the job."""
        inf = self.inflight.get(rid)
        if inf is None or inf.superseded:
            return
        log.warning("dropping job %s: %s", rid, why)
        inf.superseded = True
        self.engine.abort(rid)

    # -- control ----------------------------------------------------------------------------------
    def _init_cancels_cursor(self) -> None:
        last = self.r.xrevrange(self.keys.cancels, count=1)
        self._cancels_last = as_str(last[0][0]) if last else "0-0"

    def _poll_cancels(self) -> None:
        if not self.inflight or not self.gate.ready():
            return
        try:
            resp = self.r.xread({self.keys.cancels: self._cancels_last}, count=1000)
        except REDIS_ERRORS as e:
            log.warning("redis unavailable polling cancels: %s (retry in %.1fs)", e, self.gate.fail())
            return
        for _, msgs in resp or []:
            for eid, fields in msgs:
                self._cancels_last = as_str(eid)
                rid = as_str(fields.get(b"id", fields.get("id", b"")))
                self.end_early(rid, "cancelled", "cancelled", "cancelled by request")

    def _expire_deadlines(self) -> None:
        now = time.time()
        for inf in list(self.inflight.values()):
            if inf.job.deadline is not None and inf.job.deadline < now and inf.end_status is None:
                self.end_early(inf.id, "expired", "deadline_exceeded", "deadline passed while running")

    def end_early(self, rid: str, status: str, code: str, message: str) -> None:
        """Abort a running request; its result (with partial text) is written when the engine reports the abort."""
        inf = self.inflight.get(rid)
        if inf is None or inf.end_status is not None or inf.superseded:
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
            "duplicate_finals": self.writer.finals_lost,
        }
        key = self.keys.worker(self.s.name)
        flat = [x for k, v in info.items() for x in (k, orjson.dumps(v))]
        self.outbox.add("HSET", key, *flat, droppable=True)
        self.outbox.add("EXPIRE", key, self.d.worker_ttl_s, droppable=True)
        self.outbox.add("SADD", self.keys.workers, self.s.name, droppable=True)
