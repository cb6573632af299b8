"""The worker: drain Redis streams into the engine, one engine step at a time, and write results back.

Redis holds the backlog: the worker reads only as many jobs as the engine can admit now. Each step's writes
(token deltas, results, acks) go out in one MULTI/EXEC through the Outbox, so a result and the ack of its
job land together or not at all; a job whose worker dies stays pending and is reclaimed (spool.worker.leases).

While Redis is away the engine keeps stepping: reads are skipped under a capped backoff, writes wait in the
Outbox, and everything finished meanwhile is written once Redis answers again.

Owners: admission (entry -> engine request), inflight (the table of running jobs), leases (claims,
reclaims, poison), finish (every write that ends a job), tokens (live token events), outbox (the writes).
"""
from __future__ import annotations

import logging
import signal
import time

import orjson
import redis

from spool.engine import LLMEngine
from spool.engine.step_gc import GEN0_PER_ROW
from spool.protocol import PRIORITY_RANK, Defaults, Job, Keys, Limits, validate_id
from spool.protocol.commands import as_str, entry_field
from spool.protocol.connection import TRANSIENT_ERRORS, refresh_master
from spool.worker.admission import Entry, Rejection, admit_checks, check_runnable, parse, submit
from spool.worker.cluster_io import ShardReader
from spool.worker.gc_pacing import GcPacer
from spool.worker.inflight import InFlightTable, wire_logprobs
from spool.protocol.connection import redact_url
from spool.worker.joblog import JobLog, log_startup
from spool.worker.leases import LeaseActions, Leases, is_nogroup
from spool.worker.metrics import CountingBackoff, WorkerMetrics
from spool.worker.observe import ObservedFinisher
from spool.worker.outbox import Outbox
from spool.worker.placement import placement
from spool.worker.quarantine import HAND_OVER, POISON, Quarantine
from spool.worker.settings import WorkerSettings
from spool.worker.step_errors import EXIT_DEVICE_ERROR, recover
from spool.worker.tokens import TokenStreamWriter
from spool.worker.watchdog import StepWatchdog

log = logging.getLogger(__name__)

# Jobs read per stream at once. An idle engine starts on the first READ_FIRST at once: reading, checking and
# submitting 512 jobs before the first launch kept the device idle for ~0.2 s of every burst (bench/e2e.py
# --sim); the rest follow READ_PER_TICK at a time while the steps compute, so one tick's reads never hold up
# the next launch (and the interactive read before it) for long.
READ_FIRST = 64
READ_PER_TICK = 128


class Worker:
    """A long-lived consumer of the jobs streams around one LLMEngine."""

    def __init__(self, engine: LLMEngine, redis_client: redis.Redis, settings: WorkerSettings,
                 limits: Limits | None = None, defaults: Defaults | None = None):
        self.engine = engine
        self.redis = redis_client
        self.settings = settings
        self.keys = Keys(settings.prefix, job_shards=settings.job_shards)
        validate_id(settings.name, "worker name")  # it keys the heartbeat and names the consumer: fail at start
        self.limits = limits or Limits.from_env()
        self.defaults = defaults or Defaults.from_env()
        # Pauses after Redis failures stay well under claim_idle, so that when Redis comes back this worker
        # re-leases its jobs before other workers take them for abandoned.
        lease_s = max(0.1, settings.claim_idle_ms / 4000)
        self.outbox = Outbox(redis_client, backoff=CountingBackoff(cap_s=min(5.0, lease_s)))
        self.finisher = ObservedFinisher(self.outbox, self.keys, self.defaults, settings.name,
                                         self.limits.max_job_bytes)
        self.tokens = TokenStreamWriter(self.outbox, self.keys, self.defaults, settings.stream_interval_ms)
        self.gate = CountingBackoff(cap_s=min(2.0, lease_s))  # reads: paused together while Redis does not answer
        self.inflight = InFlightTable(engine.abort)
        self.reader = ShardReader(redis_client)  # one XREADGROUP per hash slot on a cluster, shards in turn
        self.leases = Leases(redis_client, self.keys, settings, self.inflight, self.gate, self.capacity, self.outbox)
        self.quarantine = Quarantine(redis_client, self.outbox, self.keys, self.defaults, settings)
        self.stopping = False  # warm stop: read nothing new, finish what runs within the grace period
        self.stop_now = False  # cold stop: leave at once; unfinished jobs stay pending for another worker
        self.exit_code = 0  # EXIT_DEVICE_ERROR after a device error (spool.worker.step_errors)
        self.watchdog = StepWatchdog(settings.step_timeout_s)  # a hung step ends the process (spool.worker.watchdog)
        self._ready: list = []  # the last collected step's deltas, published during the next step
        self._awaiting_first: set[str] = set()  # interactive jobs in flight whose first output is not written yet
        # Collections off the step path (spool.worker.gc_pacing); the young threshold sized for the engine's rows.
        rows = getattr(engine.config, "max_running_seqs", engine.config.max_num_seqs)
        self.gc = GcPacer(young_threshold=GEN0_PER_ROW * rows)
        self.started = time.time()
        self._next_heartbeat = 0.0
        self._cancels_last = "$"
        self._groups_ok = False
        # For operators: a log line per finished job, and Prometheus metrics when a port is set (spool.worker.metrics).
        self.metrics = WorkerMetrics(self) if settings.metrics_port is not None else None
        self.finisher.job_log, self.finisher.metrics = JobLog.for_keys(self.keys), self.metrics
        self._rate_since = (time.time(), 0)  # (time, generated tokens) at the last heartbeat: its tokens/s
        self.placement = placement()  # host, pid, and the GPUs and supervisor of a `--gpus` worker process

    @property
    def jobs_done(self) -> int:
        """Final results this worker has queued (completed, failed, cancelled or expired)."""
        return self.finisher.finals_queued

    # -- lifecycle --------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        """First call: stop reading new jobs and finish in-flight ones within the grace period (warm stop).
        A second call while stopping: leave at once, unfinished jobs stay pending for another worker (cold)."""
        if self.stopping:
            if not self.stop_now:
                log.warning("second stop signal: leaving now; %d unfinished jobs stay pending for another worker",
                            len(self.inflight))
            self.stop_now = True
            return
        log.info("stop requested: finishing %d in-flight jobs (grace %.0fs); signal again to stop at once",
                 len(self.inflight), self.settings.grace_period_s)
        self.stopping = True

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start a warm stop; a second one makes it a cold stop."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def start(self) -> bool:
        """Create the groups and take back this name's pending jobs, waiting for Redis if it is away; False if
        stopped meanwhile."""
        while not self.stopping:
            try:
                self.ensure_groups(strict=True)
                self._init_cancels_cursor()
                self._apply(self.leases.recover_own())
                return True
            except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as e:
                raise SystemExit(f"spool worker: Redis refused our credentials: {e}") from None
            except (*TRANSIENT_ERRORS, redis.ResponseError) as e:
                pause = self.gate.fail()
                log.warning("redis at %s not ready at start-up (%s); retry in %.1fs",
                            redact_url(self.settings.redis_url), e, pause)
                time.sleep(pause)
        return False

    def run(self) -> int:
        """Serve until stopped (or max_jobs done); returns the process exit code."""
        if self.metrics is not None:
            self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        log_startup(self, self.settings.redis_url)
        if not self.start():
            self._close_metrics()
            return 0
        log.info("worker %s serving %s", self.settings.name, ", ".join(self.keys.all_jobs))
        self.watchdog.start()
        self.gc.activate()
        stop_deadline = None
        try:
            while not self.stop_now:
                if self.stopping and stop_deadline is None:
                    stop_deadline = time.monotonic() + self.settings.grace_period_s
                if self.stopping and (not self.inflight or time.monotonic() > stop_deadline):
                    break
                if (self.settings.max_jobs is not None and self.jobs_done >= self.settings.max_jobs
                        and not self.inflight):
                    break
                self.tick()
            self._leave()
        finally:
            self.gc.release()
        return self.exit_code

    def tick(self) -> None:
        """One iteration: launch an engine step, talk to Redis while the device computes it, then collect it.

        Everything that waits on Redis (publishing the previous step's tokens, heartbeat, leases, reading
        jobs and cancels) runs between launch and collect, so on a GPU the round trips hide behind the
        forward pass instead of adding to it. Jobs admitted and aborts made meanwhile take effect next step.
        The exceptions are for interactive jobs: their first output is written, and their stream read, just
        before the launch (with async scheduling the device still computes the step launched last tick).
        """
        began = time.perf_counter()
        busy = self.engine.has_unfinished_requests()
        ordered = self.reader.by_priority(self.keys)  # interactive shards first, each priority's in turn
        interactive, lower = ordered[:self.keys.job_shards], ordered[self.keys.job_shards:]
        if self._awaiting_first and self._ready:
            self._publish_first_outputs()
        if busy and not self.stopping:
            # One small read right before the launch: an interactive job that arrived during the last step
            # starts in this one, instead of waiting in Redis for the whole step. Bulk waits for the read below.
            self._admit(idle=False, streams=interactive)
        if busy:
            # A quarantined job about to be computed alone: on record first, so a crash in it is evidence.
            self.quarantine.mark_running(self.engine.isolated_request())
        step = self._launch() if busy else None
        self._publish(self._ready)
        self._ready = []
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._heartbeat()
            self._next_heartbeat = now + self.settings.heartbeat_s
        self._apply(self.leases.maintain(outbox_healthy=self.outbox.healthy, may_reclaim=not self.stopping))
        if not self.stopping:
            # Busy: the interactive stream was just read; idle: block on every stream.
            self._admit(idle=step is None, streams=lower if busy else None)
        self._poll_cancels()
        self._expire_deadlines()
        self.outbox.flush()
        if step is not None:
            self._ready = self._collect(step)
            if self.metrics is not None:
                self.metrics.observe_step(time.perf_counter() - began)
        elif self.gate.failing or not self.outbox.healthy:
            time.sleep(0.05)  # Redis is away and there is nothing to compute: don't spin
        elif not self.inflight:
            self.gc.idle()

    # -- engine steps --------------------------------------------------------------------------------
    def _launch(self):
        try:
            with self.watchdog.guard("launch"):
                return self.engine.launch()
        except Exception as error:  # noqa: BLE001 - a step's failure must not take the worker down
            self._ready.extend(self._step_failed(error, None))
            return None

    def _collect(self, step) -> list:
        try:
            with self.watchdog.guard("collect"):
                return self.engine.collect(step)
        except Exception as error:  # noqa: BLE001 - as in _launch
            return self._step_failed(error, step)

    def _step_failed(self, error: Exception, step) -> list:
        """A step raised: its jobs fail with engine_error, a device error ends the worker (spool.worker.step_errors);
        returns final deltas to publish."""
        failure = recover(self.engine, self.inflight, error, step)
        if failure.fatal:
            self.exit_code, self.stopping, self.stop_now = EXIT_DEVICE_ERROR, True, True
            return []
        for inf in failure.finished:
            self._awaiting_first.discard(inf.id)
            if inf.superseded:
                self.tokens.forget(inf.id)
            else:
                self.tokens.finish(inf)  # coalesced deltas not yet written go ahead of the result, as in _publish
                self.finisher.complete(inf)
        return failure.deltas

    def _leave(self) -> None:
        device_lost = self.exit_code == EXIT_DEVICE_ERROR
        # Unfinished now (end of the grace period, or a cold stop): handed back for another worker at once,
        # their delivery counts unchanged (an operator stop is no evidence against a job). After a device
        # error they stay pending as after a crash: it may be a job's doing, so it counts as a delivery.
        for inf in self.inflight.abandon_all():
            if device_lost:
                continue
            self.leases.release(inf.stream, inf.entry_id, inf.deliveries)
            if inf.quarantined:
                self.quarantine.unmark(inf.id)
        self._publish(self._ready)
        self._ready = []
        while self.engine.has_unfinished_requests() and not device_lost:  # a lost device computes nothing more
            with self.watchdog.guard("final steps"):
                self._publish(self.engine.step())
        self.outbox.add("SREM", self.keys.workers, self.settings.name)
        self.outbox.add("DEL", self.keys.worker(self.settings.name))
        # Results finished during an outage are still in the outbox: give Redis a little time to come back.
        give_up = time.monotonic() + (0.0 if self.stop_now else min(self.settings.grace_period_s, 10.0))
        while not self.outbox.flush() and time.monotonic() < give_up:
            time.sleep(0.1)
        if len(self.outbox):
            log.error("redis unavailable at exit: %d writes lost (their jobs stay pending and will be rerun)",
                      len(self.outbox))
        log.info("worker %s stopped after %d jobs", self.settings.name, self.jobs_done)
        self._close_metrics()

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    # -- reading ----------------------------------------------------------------------------------
    def ensure_groups(self, strict: bool = False) -> None:
        """Create the consumer group on every jobs stream (again after a Redis restart that lost them)."""
        try:
            for stream in self.keys.all_jobs:
                try:
                    # Start at 0: jobs XADDed before any worker existed are served too.
                    self.redis.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
                    if self._groups_ok:
                        log.warning("consumer group on %s was gone (Redis restarted without persistence?); "
                                    "recreated", stream)
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
            self._groups_ok = True
        except (*TRANSIENT_ERRORS, redis.ResponseError) as e:
            if strict:
                raise
            log.warning("could not create consumer groups: %s (retry in %.1fs)", e, self.gate.fail())

    def _read(self, streams: dict[str, str], count: int, block: int | None = None) -> list:
        try:
            resp = self.reader.read(self.keys.group, self.settings.name, streams, count=count, block=block)
            self.gate.ok()
            return resp or []
        except TRANSIENT_ERRORS as e:
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
        if self.settings.max_jobs is not None:
            cap = min(cap, self.settings.max_jobs - self.jobs_done - len(self.inflight))
        return cap

    def _admit(self, idle: bool, streams: list[str] | None = None) -> None:
        """Read what the engine can admit now: all streams, interactive first, or only `streams`."""
        if not self.outbox.healthy or not self.gate.ready():
            return
        if idle and not self.inflight:
            # Nothing to compute: send what is queued, then block until a job arrives, on every priority.
            if not self.outbox.flush():
                return
            cap = min(self.capacity(self.keys.jobs()), READ_FIRST)
            resp = self._read({s: ">" for s in self.keys.all_jobs}, cap, self.settings.block_ms) if cap > 0 else []
        else:
            resp, taken = [], 0
            for stream in self.reader.by_priority(self.keys) if streams is None else streams:  # interactive first
                cap = min(self.capacity(stream) - taken, READ_PER_TICK)  # entries read above: not in the engine yet
                if cap <= 0:
                    continue
                got = self._read({stream: ">"}, cap)
                resp.extend(got)
                taken += sum(len(msgs) for _, msgs in got)
                if self.gate.failing:
                    break
        entries = [Entry(as_str(stream), as_str(eid), fields or {}) for stream, msgs in resp for eid, fields in msgs]
        entries.sort(key=lambda e: PRIORITY_RANK[self.keys.priority_of(e.stream)])  # interactive first
        self.handle_entries(entries)

    def handle_entries(self, entries: list[Entry], restart: bool = False) -> None:
        """Validate and admit entries (new or reclaimed); everything that cannot run gets its result now.

        An entry whose id another document holds is a duplicate_id dead letter, never a result: that id's
        result and stream belong to the other job. A suspect (delivered too often) runs in quarantine.
        """
        checked: list[tuple[Entry, str, Job | Rejection]] = []
        for entry in entries:
            parsed = parse(entry, self.keys, self.limits)
            if isinstance(parsed, Rejection):
                if parsed.id is None or entry.raw is None:
                    self.finisher.reject(parsed)  # no id: a dead letter; nobody's result is at stake
                else:
                    checked.append((entry, parsed.id, parsed))
            else:
                checked.append((entry, *parsed))
        if not checked:
            return
        try:
            checks = admit_checks(self.redis, self.keys, self.defaults, [(rid, e.raw) for e, rid, _ in checked])
        except (*TRANSIENT_ERRORS, redis.ResponseError) as e:
            # Already delivered to us: they stay pending and come back through a reclaim.
            log.warning("redis could not check new jobs (%s); they stay pending (retry in %.1fs)",
                        e, self.gate.fail())
            return
        now = time.time()
        admitted_any = False
        for (entry, rid, job), check in zip(checked, checks):
            if not check.same_document:
                self.finisher.duplicate(entry, rid)
                continue
            if isinstance(job, Rejection):
                self.finisher.reject(job)
                continue
            running = self.inflight.get(rid)
            if running is not None and running.superseded:
                continue  # our run of this id is being dropped: leave the entry pending for a later reclaim
            if check.has_result or running is not None:
                # Final already (or running here): a resend or a redelivery must not overwrite it.
                log.info("job %s already final or in flight; acking duplicate entry %s", rid, entry.entry_id)
                self.finisher.ack(entry.stream, entry.entry_id)
                continue
            quarantined = self.quarantine.is_suspect(entry.deliveries)
            if quarantined:
                verdict, deaths = self.quarantine.verdict(rid, check.quarantine)
                if verdict == POISON:
                    self._poison(entry, rid, job, deaths)
                    continue
                if verdict == HAND_OVER:
                    log.warning("job %s last died alone on this worker: handing it to another", rid)
                    self.leases.release(entry.stream, entry.entry_id, entry.deliveries)
                    continue
            rejection = check_runnable(entry, rid, job, check.cancelled, now)
            admitted = rejection or submit(self.engine, entry, rid, job, self.keys, self.limits, quarantined,
                                           self.settings.tool_call_parser)
            if isinstance(admitted, Rejection):
                self.finisher.reject(admitted)
                continue
            self.inflight.add(admitted)
            admitted_any = True
            if PRIORITY_RANK[admitted.priority] == 0:
                self._awaiting_first.add(rid)
            self.outbox.add("SET", self.keys.status(rid), "running", "EX", self.defaults.status_ttl_s)
            if restart:
                self.tokens.restart(admitted, "job reclaimed from a worker that stopped")
        if admitted_any:
            self.gc.admitted()

    def _apply(self, actions: LeaseActions) -> None:
        """Carry out what a lease pass decided."""
        if actions.groups_lost:
            self.ensure_groups()
        for rid, why in actions.supersedes:
            self.inflight.supersede(rid, why)
        for stream, entry_id in actions.gone:
            self.outbox.add("XACK", stream, self.keys.group, entry_id)
        if actions.takeovers:
            if self.metrics is not None:
                self.metrics.on_reclaimed(len(actions.takeovers))
            self.handle_entries(actions.takeovers, restart=True)

    def _poison(self, entry: Entry, rid: str, job: Job, deaths: int) -> None:
        reason = (f"a worker died {deaths} times while this job ran alone (limit "
                  f"{self.settings.max_quarantine_deaths}), after {entry.deliveries} deliveries")
        self.finisher.poison(entry, rid, reason, job)

    # -- writing ----------------------------------------------------------------------------------
    def _publish_first_outputs(self) -> None:
        """Write interactive jobs' first output now, before the launch, in a transaction of its own.

        Otherwise it would leave with the tick's other writes, after the launch (which schedules hundreds of
        sequences), the reads and the lease work. With async scheduling the device still computes the step
        launched last tick meanwhile, so the launch loses nothing. Their deltas keep their order: a request's
        deltas of one step all go here or all stay.
        """
        awaiting = self._awaiting_first
        first = [d for d in self._ready if d.request_id in awaiting]
        if not first:
            return
        self._ready = [d for d in self._ready if d.request_id not in awaiting]
        awaiting.difference_update(d.request_id for d in first)
        self._publish(first)
        self.outbox.flush()

    def _publish(self, deltas) -> None:
        for delta in deltas:
            inf = self.inflight.get(delta.request_id)
            if inf is None:
                continue
            inf.apply(delta)
            if inf.job.stream and not inf.superseded and (delta.new_text or delta.new_token_ids):
                lps = wire_logprobs(delta.new_logprobs) if delta.new_logprobs and inf.job.logprobs is not None else None
                self.tokens.delta(inf, delta.index, delta.new_text, delta.new_token_ids, lps)
            if delta.finished and inf.finished:  # only a finishing delta can complete the request
                self.inflight.remove(inf.id)
                self._awaiting_first.discard(inf.id)
                if inf.superseded:
                    self.tokens.forget(inf.id)
                else:
                    self.tokens.finish(inf)  # its last deltas go ahead of the result, in the same transaction
                    self.finisher.complete(inf)
        self.tokens.flush()  # coalesced deltas whose stream interval has passed (the first ones at once)

    # -- control ----------------------------------------------------------------------------------
    def _init_cancels_cursor(self) -> None:
        last = self.redis.xrevrange(self.keys.cancels, count=1)
        self._cancels_last = as_str(last[0][0]) if last else "0-0"

    def _poll_cancels(self) -> None:
        if not self.inflight or not self.gate.ready():
            return
        try:
            resp = self.redis.xread({self.keys.cancels: self._cancels_last}, count=1000)
        except TRANSIENT_ERRORS as e:
            log.warning("redis unavailable polling cancels: %s (retry in %.1fs)", e, self.gate.fail())
            return
        for _, msgs in resp or []:
            for entry_id, fields in msgs:
                self._cancels_last = as_str(entry_id)
                rid = as_str(entry_field(fields, "id") or b"")
                self.inflight.end_early(rid, "cancelled", "cancelled", "cancelled by request")

    def _expire_deadlines(self) -> None:
        now = time.time()
        for inf in self.inflight.values():
            if inf.job.deadline is not None and inf.job.deadline < now and inf.end_status is None:
                self.inflight.end_early(inf.id, "expired", "deadline_exceeded", "deadline passed while running")

    def _heartbeat(self) -> None:
        try:  # Sentinel: leave a demoted master within a heartbeat, not when the sentinels get round to it
            if refresh_master(self.redis):
                log.warning("the Redis master moved (Sentinel failover): reconnecting to the new one")
        except TRANSIENT_ERRORS as e:
            log.warning("could not ask the sentinels for the master: %s", e)
        now, generated = time.time(), self.engine.stats.generation_tokens
        since, before = self._rate_since
        self._rate_since = (now, generated)
        scheduler = self.engine.scheduler
        info = {
            "name": self.settings.name,
            "model": self.engine.config.model,
            "device": str(self.engine.runner.device),
            "running": len(scheduler.running),  # sequences, as spool_running_requests
            "waiting": len(scheduler.waiting),
            "tokens_per_s": round((generated - before) / max(now - since, 1e-3), 1),
            "max_num_seqs": self.engine.config.max_num_seqs,
            "started": self.started,
            "last_seen": time.time(),
            "in_flight": len(self.inflight),
            "kv_usage": round(self.engine.kv_cache_usage(), 4),
            "jobs_done": self.jobs_done,
            "steps": self.engine.stats.num_steps,
            "generated_tokens": self.engine.stats.generation_tokens,
            "duplicate_finals": self.finisher.finals_lost,
            **self.placement,
        }
        key = self.keys.worker(self.settings.name)
        flat = [x for k, v in info.items() for x in (k, orjson.dumps(v))]
        self.outbox.add("HSET", key, *flat, droppable=True)
        self.outbox.add("EXPIRE", key, self.defaults.worker_ttl_s, droppable=True)
        self.outbox.add("SADD", self.keys.workers, self.settings.name, droppable=True)
