"""What the gateway knows about the deployment behind it: live workers and their models (from their heartbeats:
the `{prefix}workers` set and each `{prefix}worker:{name}` hash's `model`), and each jobs stream's backlog.

A stream's backlog is its length (jobs queued or running: workers delete finished entries, so this is the
number spool.protocol.commands.queue_backlog computes, in one XLEN). One task re-reads them every `poll_s`, so
admission checks (unknown model 404, backlog 429, no worker 503)
cost a request no Redis round trip. Between two reads the backlog counts this process's own enqueues, so a
burst cannot slip past --max-backlog.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

import orjson

from spool.protocol import PRIORITIES
from spool.protocol.commands import as_str, execute_async
from spool.protocol.keys import Keys, validate_id

log = logging.getLogger("spool.gateway")


class Deployment:
    """Live workers (name -> model) and backlog per priority, as last read from Redis."""

    def __init__(self, redis, keys: Keys, poll_s: float = 0.5):
        self.redis, self.keys, self.poll_s = redis, keys, poll_s
        self.workers: dict[str, str] = {}
        self.backlog: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
        self.redis_ok = False
        self.last_error: str | None = None
        self.read_at = 0.0  # monotonic time of the last successful read
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        """Read the workers set, their heartbeats' models and the jobs streams' lengths (two round trips)."""
        streams = self.keys.all_jobs  # every shard of every priority
        members, *lengths = await execute_async(self.redis, [("smembers", (self.keys.workers,), {}),
                                                             *[("xlen", (s,), {}) for s in streams]])
        names = []
        for m in members:
            try:
                names.append(validate_id(as_str(m), "worker name"))
            except ValueError:
                continue  # not written by a worker of ours: never build a key from it
        models = await execute_async(self.redis, [("hget", (self.keys.worker(n), "model"), {}) for n in names])
        workers = {}
        for name, raw in zip(names, models):
            if raw is not None:  # the heartbeat hash expires SPOOL_WORKER_TTL_S after a worker's last beat
                workers[name] = _model_name(raw)
        self.workers = workers
        backlog = dict.fromkeys(PRIORITIES, 0)
        for stream, n in zip(streams, lengths):
            backlog[self.keys.priority_of(stream)] += int(n)
        self.backlog = backlog
        self.redis_ok, self.last_error, self.read_at = True, None, time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()

    async def run(self) -> None:
        """Refresh for ever (the app's lifespan cancels it); a Redis error is remembered and retried."""
        while True:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - Redis away, or a reply we cannot read: keep serving
                if self.redis_ok or self.last_error is None:
                    log.warning("cannot read the deployment's state from Redis: %s", e)
                self.redis_ok, self.last_error = False, str(e)
            await asyncio.sleep(self.poll_s)

    def start(self) -> None:
        """Start the refresh task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="spool-deployment")

    async def stop(self) -> None:
        """Cancel the refresh task."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def models(self) -> list[str]:
        """The distinct models live workers serve, sorted."""
        return sorted(set(self.workers.values()))

    def note_enqueued(self, priority: str) -> None:
        """Count our own enqueue until the next read says what the stream holds."""
        self.backlog[priority] = self.backlog.get(priority, 0) + 1

    async def wait_for_worker(self, timeout_s: float, gone: Callable[[], Awaitable[bool]] | None = None) -> bool:
        """True once a live worker is known; False after `timeout_s` (or at once if `gone()` says the client left)."""
        end = time.monotonic() + timeout_s
        while not self.workers:
            left = end - time.monotonic()
            if left <= 0 or (gone is not None and await gone()):
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, self.poll_s * 2))
            except TimeoutError:
                pass
        return True


def _model_name(raw: bytes | str) -> str:
    """A heartbeat field is JSON (the worker writes orjson.dumps(value)); older writers may have written text."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return as_str(raw, errors="replace")
    return value if isinstance(value, str) else str(value)


def model_aliases(model: str) -> set[str]:
    """The names a request may use for a worker's model: as the worker reports it, and its directory's name."""
    return {model, os.path.basename(model.rstrip("/"))} - {""}
