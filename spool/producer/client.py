"""Synchronous producer client: enqueue jobs, wait for results, tail token streams, cancel."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import redis

from spool.producer import ops
from spool.producer.errors import refused_for_memory
from spool.protocol import JobError, Result, TokenEvent
from spool.protocol.commands import execute
from spool.protocol.connection import connect, refresh_master


class Client(ops.ClientBase):
    """Talks to one spool deployment through Redis (see docs/PROTOCOL.md)."""

    _connect = staticmethod(connect)

    def enqueue(self, prompt: str | None = None, **job: Any) -> str:
        """Validate one job, XADD it to its priority's stream and mark it queued; returns its id.

        Keyword arguments are ops.build_job's: messages, prompt_token_ids, id, stream, priority, deadline,
        metadata, and any sampling field of the Job document (max_tokens=..., temperature=..., ...).
        """
        return self._durably(lambda: self._run(ops.enqueue_steps(self.ctx, prompt, **job)))

    def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Enqueue dicts of enqueue() arguments, pipelined in chunks; returns ids in order."""
        jobs = list(jobs)  # a second pass may be needed (_durably)
        return self._durably(lambda: self._run(ops.enqueue_many_steps(self.ctx, jobs)))

    def result(self, id: str, timeout: float | None = None) -> Result:
        """Block until the final Result of `id` exists; TimeoutError after `timeout` seconds."""
        return self._run(ops.result_steps(self.ctx, id, timeout))

    def stream(self, id: str, timeout: float | None = None, last_id: str = "0-0") -> Iterator[TokenEvent]:
        """Yield token events after entry `last_id` until done; a restart event means drop partial output."""
        return self._drive(ops.stream_steps(self.ctx, id, timeout, last_id))

    def cancel(self, id: str) -> None:
        """Ask workers to stop `id` (queued or running); its result will say 'cancelled'."""
        self._run(ops.cancel_steps(self.ctx, id))

    def status(self, id: str) -> str:
        """'completed' | 'failed' | 'cancelled' | 'expired' | 'queued' | 'running' | 'unknown'."""
        return self._run(ops.status_steps(self.ctx, id))

    def close(self) -> None:
        """Release the connection pool."""
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _durably(self, enqueue: Callable[[], Any]) -> Any:
        """Run an enqueue; if the Sentinel master moved meanwhile (the write may have gone to the old master),
        run it again once on the new one (the digest makes the second pass safe)."""
        try:
            ids = enqueue()
        except JobError as e:
            if e.code != "not_replicated" or not refresh_master(self.redis):
                raise
            return enqueue()
        # A replica acknowledged it, but was that the old master's replica, about to be re-pointed (and to drop
        # it)? If the sentinels name another master now, enqueue again there.
        if self.ctx.durable and refresh_master(self.redis):
            return enqueue()
        return ids

    def _drive(self, steps: ops.Steps) -> Iterator[TokenEvent]:
        item = ops.advance(steps, None)
        while not isinstance(item, ops.Finished):
            if isinstance(item, ops.RoundTrip):
                try:
                    reply = execute(self.redis, item.cmds, item.transaction)
                except redis.exceptions.OutOfMemoryError as e:
                    raise refused_for_memory(steps, e) from e
            else:
                reply = yield item  # None: a plain iteration sends nothing back
            item = ops.advance(steps, reply)
        return item.value

    def _run(self, steps: ops.Steps) -> Any:
        return ops.run_to_end(self._drive(steps))
