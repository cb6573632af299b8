"""Synchronous producer client: enqueue jobs, wait for results, tail token streams, cancel."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import redis

from producer import ops
from producer.connection import connect
from producer.defaults import DEFAULT_PREFIX, Defaults
from producer.keys import Keys
from producer.schema import Limits, Result, TokenEvent


class Client:
    """Talks to one spool deployment through Redis (see docs/PROTOCOL.md)."""

    def __init__(
        self,
        redis_url: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        limits: Limits | None = None,
        *,
        defaults: Defaults | None = None,
        connection: redis.Redis | None = None,
    ):
        self.ctx = ops.Context(Keys(prefix), limits or Limits.from_env(), defaults or Defaults.from_env())
        # decode_responses=False: payloads stay bytes for orjson, and one code path serves both clients.
        self.redis = connection if connection is not None else connect(redis_url, defaults=self.ctx.defaults)

    @property
    def keys(self) -> Keys:
        """The key layout in use."""
        return self.ctx.keys

    def enqueue(
        self,
        prompt: str | None = None,
        *,
        messages: list[Mapping[str, Any]] | None = None,
        prompt_token_ids: list[int] | None = None,
        id: str | None = None,
        stream: bool = False,
        priority: str = "interactive",
        deadline: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> str:
        """Validate one job, XADD it to its priority's stream and mark it queued; returns its id."""
        steps = ops.enqueue_steps(self.ctx, prompt, messages=messages, prompt_token_ids=prompt_token_ids, id=id,
                                  stream=stream, priority=priority, deadline=deadline, metadata=metadata,
                                  **sampling)
        return self._run(steps)

    def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Enqueue dicts of enqueue() arguments, pipelined in chunks; returns ids in order."""
        return self._run(ops.enqueue_many_steps(self.ctx, jobs))

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

    def _execute(self, batch: ops.Batch) -> list[Any]:
        with self.redis.pipeline(transaction=batch.transaction) as pipe:
            for name, args, kwargs in batch.cmds:
                getattr(pipe, name)(*args, **kwargs)
            return pipe.execute()

    def _drive(self, steps: ops.Steps) -> Iterator[TokenEvent]:
        reply = None
        while True:
            try:
                item = steps.send(reply)
            except StopIteration as stop:
                return stop.value
            if isinstance(item, ops.Batch):
                reply = self._execute(item)
            else:
                reply = None
                yield item

    def _run(self, steps: ops.Steps) -> Any:
        return ops.run_to_end(self._drive(steps))
