"""asyncio producer client: the same verbs as Client, as coroutines and async iterators."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis

from producer import ops
from producer.connection import connect_async
from producer.defaults import DEFAULT_PREFIX, Defaults
from producer.keys import Keys
from producer.schema import Limits, Result, TokenEvent


class AsyncClient:
    """Talks to one spool deployment through Redis without blocking the event loop."""

    def __init__(
        self,
        redis_url: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        limits: Limits | None = None,
        *,
        defaults: Defaults | None = None,
        connection: aioredis.Redis | None = None,
    ):
        self.ctx = ops.Context(Keys(prefix), limits or Limits.from_env(), defaults or Defaults.from_env())
        # Resolving the URL may start the embedded server: a one-off blocking step at construction time.
        self.redis = connection if connection is not None else connect_async(redis_url, defaults=self.ctx.defaults)

    @property
    def keys(self) -> Keys:
        """The key layout in use."""
        return self.ctx.keys

    async def enqueue(
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
        return await self._run(steps)

    async def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Enqueue dicts of enqueue() arguments, pipelined in chunks; returns ids in order."""
        return await self._run(ops.enqueue_many_steps(self.ctx, jobs))

    async def result(self, id: str, timeout: float | None = None) -> Result:
        """Wait until the final Result of `id` exists; TimeoutError after `timeout` seconds."""
        return await self._run(ops.result_steps(self.ctx, id, timeout))

    async def stream(self, id: str, timeout: float | None = None, last_id: str = "0-0") -> AsyncIterator[TokenEvent]:
        """Yield token events after entry `last_id` until done; a restart event means drop partial output."""
        steps = ops.stream_steps(self.ctx, id, timeout, last_id)
        reply = None
        while True:
            try:
                item = steps.send(reply)
            except StopIteration:
                return
            if isinstance(item, ops.Batch):
                reply = await self._execute(item)
            else:
                reply = None
                yield item

    async def cancel(self, id: str) -> None:
        """Ask workers to stop `id` (queued or running); its result will say 'cancelled'."""
        await self._run(ops.cancel_steps(self.ctx, id))

    async def status(self, id: str) -> str:
        """'completed' | 'failed' | 'cancelled' | 'expired' | 'queued' | 'running' | 'unknown'."""
        return await self._run(ops.status_steps(self.ctx, id))

    async def aclose(self) -> None:
        """Release the connection pool."""
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _execute(self, batch: ops.Batch) -> list[Any]:
        async with self.redis.pipeline(transaction=batch.transaction) as pipe:
            for name, args, kwargs in batch.cmds:
                getattr(pipe, name)(*args, **kwargs)
            return await pipe.execute()

    async def _run(self, steps: ops.Steps) -> Any:
        # Verbs other than stream() never yield events, so every item here is a Batch.
        reply = None
        while True:
            try:
                batch = steps.send(reply)
            except StopIteration as stop:
                return stop.value
            reply = await self._execute(batch)
