"""Outbox: every Redis write of one engine step, sent in one MULTI/EXEC, kept and retried while Redis is away."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)


@dataclass(slots=True)
class Outbox:
    """Queued commands; droppable ones (token deltas) are shed first if Redis stays down for long."""

    client: redis.Redis
    max_droppable: int = 100_000
    _cmds: list[tuple[bool, tuple[Any, ...], dict]] = field(default_factory=list)
    _retry_at: float = 0.0
    _backoff: float = 0.0
    on_flushed: list = field(default_factory=list)  # callbacks run after a successful flush (e.g. forget acked jobs)

    def add(self, *args: Any, droppable: bool = False, **kwargs: Any) -> None:
        """Queue one Redis command (execute_command arguments)."""
        self._cmds.append((droppable, args, kwargs))

    def __len__(self) -> int:
        return len(self._cmds)

    @property
    def healthy(self) -> bool:
        """False while Redis writes are failing."""
        return self._backoff == 0.0

    def flush(self) -> bool:
        """Send everything in one transaction; on a connection error keep it all and back off (capped)."""
        if not self._cmds:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        pipe = self.client.pipeline(transaction=True)
        for _, args, kwargs in self._cmds:
            pipe.execute_command(*args, **kwargs)
        try:
            pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as e:
            self._backoff = min(max(self._backoff * 2, 0.1), 5.0)
            self._retry_at = now + self._backoff
            self._shed()
            log.warning("redis write failed (%s); %d commands kept, retry in %.1fs", e, len(self._cmds), self._backoff)
            return False
        finally:
            pipe.reset()
        self._cmds.clear()
        self._backoff = 0.0
        callbacks, self.on_flushed = self.on_flushed, []
        for cb in callbacks:
            cb()
        return True

    def _shed(self) -> None:
        droppable = sum(1 for d, _, _ in self._cmds if d)
        if droppable > self.max_droppable:
            # Live deltas are a convenience; results, acks and done markers are never dropped.
            self._cmds = [c for c in self._cmds if not c[0]]
            log.warning("redis unavailable: dropped %d buffered token deltas", droppable)
