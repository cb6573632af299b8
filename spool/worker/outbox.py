"""Outbox: every Redis write of one engine step, sent in one MULTI/EXEC, kept and retried while Redis is away."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from spool.protocol.connection import TRANSIENT_ERRORS, is_cluster
from spool.protocol.scripts import Script
from spool.worker.cluster_io import send_phased

log = logging.getLogger(__name__)


class Backoff:
    """Capped exponential backoff: after a failure, ready() is False until the pause has passed."""

    __slots__ = ("cap_s", "first_s", "_pause", "_retry_at")

    def __init__(self, cap_s: float = 5.0, first_s: float = 0.1):
        self.cap_s, self.first_s = cap_s, first_s
        self._pause = 0.0  # the current pause; 0 while calls succeed
        self._retry_at = 0.0  # monotonic time before which ready() is False

    def ready(self) -> bool:
        """True when a call may be tried now."""
        return time.monotonic() >= self._retry_at

    @property
    def failing(self) -> bool:
        """True from a failure until the next success."""
        return self._pause > 0.0

    def fail(self) -> float:
        """Record a failure; returns the pause before the next try."""
        self._pause = min(max(self._pause * 2, self.first_s), self.cap_s)
        self._retry_at = time.monotonic() + self._pause
        return self._pause

    def ok(self) -> None:
        """Record a success: the next failure starts from the first pause again."""
        self._pause, self._retry_at = 0.0, 0.0


OnReply = Callable[[Any], None]


@dataclass(slots=True)
class _Queued:
    args: tuple[Any, ...]  # execute_command arguments
    droppable: bool
    on_reply: OnReply | None
    script: Script | None  # the script an EVALSHA runs: loaded at the head of the transaction
    on_shed: Callable[[], None] | None = None  # a droppable command dropped while Redis stayed away
    options: dict[str, Any] | None = None  # redis-py reply parsing options (e.g. parse_justid)


@dataclass(slots=True)
class Outbox:
    """Queued commands; droppable ones (token deltas) are shed first if Redis stays down for long.

    Every write the worker makes is safe to apply twice (spool.protocol.scripts), because a transaction whose
    reply is lost is sent again in full.
    """

    client: redis.Redis
    max_droppable: int = 100_000
    backoff: Backoff = field(default_factory=Backoff)
    _cmds: list[_Queued] = field(default_factory=list)

    def add(self, *args: Any, droppable: bool = False, on_reply: OnReply | None = None,
            options: dict[str, Any] | None = None) -> None:
        """Queue one Redis command (execute_command arguments); on_reply gets its reply once it has run."""
        self._cmds.append(_Queued(args, droppable, on_reply, None, options=options))

    def add_script(self, script: Script, keys: list[str], argv: list[Any], *, droppable: bool = False,
                   on_reply: OnReply | None = None, on_shed: Callable[[], None] | None = None) -> None:
        """Queue a script call (EVALSHA; the flush loads the script first, so NOSCRIPT never happens)."""
        self._cmds.append(_Queued(script.args(keys, argv), droppable, on_reply, script, on_shed))

    def __len__(self) -> int:
        return len(self._cmds)

    @property
    def healthy(self) -> bool:
        """False while Redis writes are failing."""
        return not self.backoff.failing

    def flush(self) -> bool:
        """Send everything in one transaction; on failure keep it all and back off (capped)."""
        if not self._cmds:
            return True
        if not self.backoff.ready():
            return False
        if is_cluster(self.client):
            return self._flush_phased()
        pipe = self.client.pipeline(transaction=True)
        scripts = {q.script.sha: q.script for q in self._cmds if q.script is not None}
        for script in scripts.values():  # a restarted Redis forgot them; loading a known one costs little
            pipe.execute_command("SCRIPT", "LOAD", script.text)
        for q in self._cmds:
            pipe.execute_command(*q.args, **(q.options or {}))
        try:
            # Runtime errors of single commands (WRONGTYPE on a key someone else wrote) come back as values
            # and cost only that command; the transaction itself goes through.
            replies = pipe.execute(raise_on_error=False)
        except TRANSIENT_ERRORS as e:
            self._failed(f"redis write failed ({e})", logging.WARNING)
            return False
        except redis.ResponseError as e:
            # EXECABORT (OOM under maxmemory, NOPERM, READONLY replica): Redis refused the whole transaction.
            # Keep everything: an operator can fix it, and results must not be lost meanwhile. What is kept is
            # bounded: while writes fail the worker reads no new job, so it holds at most the results of the
            # jobs its engine held (plus droppable deltas, capped by max_droppable).
            if isinstance(e, redis.exceptions.OutOfMemoryError) or "OOM" in str(e):
                self._failed("redis refused the transaction: it is out of memory (maxmemory reached, policy "
                             "noeviction); results are kept and sent once it frees memory, no new job is read "
                             f"meanwhile [{str(e).splitlines()[0][:200]}]", logging.ERROR)
            else:
                self._failed(f"redis refused the transaction ({e})", logging.ERROR)
            return False
        finally:
            pipe.reset()
        cmds, self._cmds = self._cmds, []
        self.backoff.ok()
        for q, reply in zip(cmds, replies[len(scripts):]):
            if isinstance(reply, Exception):
                log.warning("redis %s failed: %s", _name(q.args), reply)
            if q.on_reply is not None:
                q.on_reply(reply)
        return True

    def _flush_phased(self) -> bool:
        """Redis Cluster: no MULTI/EXEC across slots, so results first, then the XACKs (spool.worker.cluster_io)."""
        scripts = list({q.script.sha: q.script for q in self._cmds if q.script is not None}.values())
        try:
            replies = send_phased(self.client, [(q.args, q.options) for q in self._cmds], scripts)
        except (*TRANSIENT_ERRORS, redis.RedisError, redis.exceptions.RedisClusterException) as e:
            self._failed(f"redis write failed ({e})", logging.WARNING)
            return False
        cmds, self._cmds = self._cmds, []
        self.backoff.ok()
        for q, reply in zip(cmds, replies):
            if isinstance(reply, Exception):
                log.warning("redis %s failed: %s", _name(q.args), reply)
            if q.on_reply is not None:
                q.on_reply(reply)
        return True

    def _failed(self, why: str, level: int) -> None:
        pause = self.backoff.fail()
        self._shed()
        log.log(level, "%s; %d commands kept, retry in %.1fs", why, len(self._cmds), pause)

    def _shed(self) -> None:
        droppable = sum(1 for q in self._cmds if q.droppable)
        if droppable > self.max_droppable:
            # Live deltas are a convenience (the final write replays a run's output into a stream that
            # lacks it); results, acks and done markers are never dropped.
            for q in self._cmds:
                if q.droppable and q.on_shed is not None:
                    q.on_shed()
            self._cmds = [q for q in self._cmds if not q.droppable]
            log.warning("redis unavailable: dropped %d buffered token deltas", droppable)


def _name(args: tuple[Any, ...]) -> str:
    return str(args[0]) if args else "?"
