"""Poison detection on evidence: a suspect job runs alone, and only deaths while it ran alone condemn it.

A worker that dies takes every job it was running down with it, so a high delivery count alone says
nothing: on spot GPUs or in a crash-looping rollout, healthy jobs pile up deliveries too. The rule:

1. Suspect: a job delivered more than `max_deliveries` times. Operator stops never add to that count (a
   worker that stops, warm or cold, hands its unfinished entries back with their count unchanged), and
   neither do entries a worker lost track of through a Redis error (taken back without a delivery).
2. Quarantine: a suspect is computed alone in its steps (LLMEngine.add_request(isolated=True)): while it
   runs, no other job on that worker is computed. Right before its first step the worker records itself
   as the job's `runner` in `{prefix}quarantine:{id}`; the final write deletes the record.
3. Evidence: a worker that takes a suspect over and finds a `runner` recorded knows that worker died while
   the job ran alone: one quarantine death (`deaths`), recorded together with the worker it died on.
4. Verdict: after `max_quarantine_deaths` such deaths the job is poison: a dead letter plus a failed
   result `poison_job`. Before that, a worker on which the job's last quarantine death happened hands the
   job to another live worker, so one flapping host cannot condemn a job by dying around it; alone, it
   runs the job itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
import redis

from spool.protocol import Defaults, Keys
from spool.protocol.commands import as_str
from spool.protocol.connection import TRANSIENT_ERRORS
from spool.worker.outbox import Outbox
from spool.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

RUN, POISON, HAND_OVER = "run", "poison", "hand_over"


@dataclass(slots=True)
class Record:
    """A job's quarantine record as ADMIT read it."""

    runner: str | None  # the worker that ran it alone and has not finished it: that worker died
    deaths: int  # deaths while it ran alone, before this one
    died_on: str | None = None  # the worker of the last such death


class Quarantine:
    """Decides what happens to a suspect job and keeps its quarantine record."""

    def __init__(self, redis_client: redis.Redis, outbox: Outbox, keys: Keys, defaults: Defaults,
                 settings: WorkerSettings):
        self.redis, self.outbox, self.keys = redis_client, outbox, keys
        self.defaults, self.settings = defaults, settings
        self.marked: str | None = None  # the request whose record names this worker as runner

    def is_suspect(self, deliveries: int) -> bool:
        """True for a job delivered more often than max_deliveries."""
        return deliveries > self.settings.max_deliveries

    def verdict(self, rid: str, record: Record) -> tuple[str, int]:
        """RUN (alone), POISON or HAND_OVER, and the quarantine deaths counted so far."""
        deaths = record.deaths
        died_on = record.died_on
        if record.runner is not None:
            deaths += 1  # its runner died while it ran alone
            died_on = record.runner
            self.outbox.add("HSET", self.keys.quarantine(rid), "deaths", deaths, "died_on", died_on)
            self.outbox.add("HDEL", self.keys.quarantine(rid), "runner")
            log.warning("job %s: worker %s died while running it alone (%d of %d)", rid, died_on, deaths,
                        self.settings.max_quarantine_deaths)
        if deaths >= self.settings.max_quarantine_deaths:
            return POISON, deaths
        if died_on == self.settings.name and self._other_workers_alive():
            return HAND_OVER, deaths
        return RUN, deaths

    def mark_running(self, rid: str | None) -> None:
        """Before the launch that computes `rid` alone: record this worker as its runner, synchronously, so
        that a crash in that step is on record. A record that cannot be written is skipped (no evidence)."""
        if rid == self.marked:
            return
        self.marked = rid
        if rid is None:
            return
        key = self.keys.quarantine(rid)
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, "runner", self.settings.name)
                pipe.expire(key, self.defaults.result_ttl_s)
                pipe.execute()
        except TRANSIENT_ERRORS as e:
            log.warning("could not record quarantine run of %s (%s): a crash now would not count", rid, e)

    def unmark(self, rid: str) -> None:
        """The worker stops without finishing `rid` (an operator stop): no death to record."""
        self.outbox.add("HDEL", self.keys.quarantine(rid), "runner")
        if self.marked == rid:
            self.marked = None

    def _other_workers_alive(self) -> bool:
        try:
            names = [as_str(n) for n in self.redis.smembers(self.keys.workers)]
            others = [n for n in names if n != self.settings.name]
            if not others:
                return False
            with self.redis.pipeline(transaction=False) as pipe:
                for name in others:
                    pipe.hget(self.keys.worker(name), "last_seen")
                seen = pipe.execute()
        except TRANSIENT_ERRORS:
            return False
        return any(value is not None and orjson.loads(value) for value in seen)
