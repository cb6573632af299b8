"""asyncio producer client: the same verbs as Client, as coroutines and async iterators."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import redis

from spool.producer import ops
from spool.producer.errors import refused_for_memory
from spool.producer.reads import SharedReads, Subscription
from spool.protocol import JobError, Result, TokenEvent
from spool.protocol.commands import execute_async
from spool.protocol.connection import connect_async, is_cluster, refresh_master_async


class AsyncClient(ops.ClientBase):
    """Talks to one spool deployment through Redis without blocking the event loop.

    shared_reads=True: the verbs waiting at the same time (result(), stream()) share one blocking XREAD on one
    connection instead of one each (spool/producer/reads.py): for a process waiting on many requests at once. Not on
    Redis Cluster (an XREAD cannot span hash slots), where it is ignored.
    """

    _connect = staticmethod(connect_async)

    def __init__(self, *args: Any, shared_reads: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shared_reads = (SharedReads(self.redis, self.ctx.defaults.block_ms)
                             if shared_reads and not is_cluster(self.redis) else None)

    async def enqueue(self, prompt: str | None = None, **job: Any) -> str:
        """Validate one job, XADD it to its priority's stream and mark it queued; returns its id (see Client)."""
        return await self._durably(lambda: self._run(ops.enqueue_steps(self.ctx, prompt, **job)))

    async def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Enqueue dicts of enqueue() arguments, pipelined in chunks; returns ids in order."""
        jobs = list(jobs)  # a second pass may be needed (_durably)
        return await self._durably(lambda: self._run(ops.enqueue_many_steps(self.ctx, jobs)))

    async def result(self, id: str, timeout: float | None = None) -> Result:
        """Wait until the final Result of `id` exists; TimeoutError after `timeout` seconds."""
        return await self._run(ops.result_steps(self.ctx, id, timeout))

    async def stream(self, id: str, timeout: float | None = None, last_id: str = "0-0") -> AsyncIterator[TokenEvent]:
        """Yield token events after entry `last_id` until done; a restart event means drop partial output."""
        async for event in self._drive(ops.stream_steps(self.ctx, id, timeout, last_id), []):
            yield event

    async def stream_batches(self, id: str, timeout: float | None = None,
                             last_id: str = "0-0") -> AsyncIterator[list[TokenEvent]]:
        """stream(), one list per Redis read (the done event ends the last one); an empty list after each
        `block_ms` of silence."""
        async for events in self._drive(ops.stream_steps(self.ctx, id, timeout, last_id, batches=True), []):
            yield events  # type: ignore[misc]

    async def cancel(self, id: str) -> None:
        """Ask workers to stop `id` (queued or running); its result will say 'cancelled'."""
        await self._run(ops.cancel_steps(self.ctx, id))

    async def status(self, id: str) -> str:
        """'completed' | 'failed' | 'cancelled' | 'expired' | 'queued' | 'running' | 'unknown'."""
        return await self._run(ops.status_steps(self.ctx, id))

    async def aclose(self) -> None:
        """Release the connection pool."""
        if self.shared_reads is not None:
            await self.shared_reads.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _durably(self, enqueue: Callable[[], Awaitable[Any]]) -> Any:
        """Client._durably's asyncio twin: once more on a new Sentinel master after not_replicated."""
        try:
            ids = await enqueue()
        except JobError as e:
            if e.code != "not_replicated" or not await refresh_master_async(self.redis):
                raise
            return await enqueue()
        if self.ctx.durable and await refresh_master_async(self.redis):
            return await enqueue()
        return ids

    async def _drive(self, steps: ops.Steps, value: list[Any]) -> AsyncIterator[TokenEvent]:
        """Run a verb's round trips and yield its events; its return value is appended to `value`."""
        subscriptions: dict[str, Subscription] = {}  # the verb's streams in the shared reads
        try:
            item = ops.advance(steps, None)
            while not isinstance(item, ops.Finished):
                if isinstance(item, ops.RoundTrip):
                    try:
                        reply = await self._round_trip(item, subscriptions)
                    except redis.exceptions.OutOfMemoryError as e:
                        raise refused_for_memory(steps, e) from e
                else:
                    reply = None
                    yield item
                item = ops.advance(steps, reply)
            value.append(item.value)
        finally:
            for sub in subscriptions.values():
                self.shared_reads.release(sub)  # type: ignore[union-attr]

    async def _round_trip(self, trip: ops.RoundTrip, subscriptions: dict[str, Subscription]) -> list[Any]:
        """One round trip's replies; a blocking read of one stream goes to the shared reads when they are on."""
        read = ops.blocking_read(trip) if self.shared_reads is not None else None
        if read is None:
            return await execute_async(self.redis, trip.cmds, trip.transaction)
        key, last, count, block_ms = read
        sub = subscriptions.get(key)
        if sub is None:
            sub = subscriptions[key] = self.shared_reads.subscribe(key, last, count)  # type: ignore[union-attr]
        first = await self.shared_reads.read(sub, last, block_ms)  # type: ignore[union-attr]
        # What rides behind the read (result_steps' GET) is sent once it returns, as Redis would run it.
        rest = await execute_async(self.redis, trip.cmds[1:]) if len(trip.cmds) > 1 else []
        return [first, *rest]

    async def _run(self, steps: ops.Steps) -> Any:
        value: list[Any] = []
        async for _ in self._drive(steps, value):
            pass  # verbs other than stream() yield no events
        return value[0]
