"""Enqueues of concurrent requests sent together: one enqueue_flow (three pipelined round trips) for every job
that arrived while the previous flow was out, instead of three round trips per request.

A burst of requests (a client opening hundreds of streams at once) otherwise spends its first second on
thousands of round trips, and the worker admits the burst that much later. Each job's claim reply is the one
enqueue_flow returns for it, so duplicate ids (409) and resends (idempotent) behave as with one job per flow;
with --durable, WAIT 1 covers the whole flow, and every job it XADDed gets not_replicated when no replica
acknowledged in time.
"""
from __future__ import annotations

import asyncio
from typing import Any

from spool.protocol import JobError
from spool.protocol.commands import ALREADY_ENQUEUED, ENQUEUED, enqueue_flow, run_flow_async
from spool.protocol.defaults import Defaults
from spool.protocol.keys import Keys

MAX_FLOW_JOBS = 256  # jobs per flow: bounds one pipeline's size (and the wait of the jobs behind it)


class Enqueuer:
    """One task that sends queued (id, stream, document) jobs in flows; enqueue() awaits a job's claim reply."""

    def __init__(self, redis_client: Any, keys: Keys, defaults: Defaults, durable: bool = False):
        self.redis, self.keys, self.defaults, self.durable = redis_client, keys, defaults, durable
        self._queue: list[tuple[tuple[str, str, bytes], asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.flows = 0  # flows sent (for tests and benchmarks)

    async def enqueue(self, rid: str, stream_key: str, doc: bytes) -> int:
        """ENQUEUED, ALREADY_ENQUEUED or DUPLICATE_ID (spool.protocol.commands); JobError not_replicated (durable)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(((rid, stream_key, doc), future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="spool-enqueuer")
        return await asyncio.shield(future)  # a caller that goes away leaves its job to the flow

    async def aclose(self) -> None:
        """Wait for the flow in flight, if any."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_FLOW_JOBS], self._queue[MAX_FLOW_JOBS:]
            # A resend of the same document while the first is in this flow rides on it (ENQUEUE would claim it
            # twice before either is marked queued, and both would be XADDed); another document under the id
            # goes in, and the script refuses it.
            first_of: dict[tuple[str, bytes], int] = {}
            jobs, sent_as = [], []
            for (rid, stream_key, doc), _ in batch:
                index = first_of.setdefault((rid, doc), len(jobs))
                if index == len(jobs):
                    jobs.append((rid, stream_key, doc))
                sent_as.append(index)
            try:
                claims, replication = await self._send(jobs)
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - Redis away, say: every job of the flow learns it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            seen: set[int] = set()
            for (_, future), index in zip(batch, sent_as):
                claim = claims[index]
                if index in seen and claim == ENQUEUED:
                    claim = ALREADY_ENQUEUED  # the resend: its document was enqueued once, for the first
                seen.add(index)
                if future.done():
                    continue
                if claim == ENQUEUED and replication is not None:
                    future.set_exception(JobError("not_replicated", replication, jobs[index][0]))
                else:
                    future.set_result(claim)

    async def _send(self, jobs: list[tuple[str, str, bytes]]) -> tuple[list[int], str | None]:
        """Run one enqueue_flow: each job's claim, and with --durable the reason when no replica acknowledged
        the jobs it XADDed (only those: a job already enqueued before needed no WAIT, as in a flow of its own)."""
        self.flows += 1
        flow = enqueue_flow(self.keys, self.defaults, jobs, durable=self.durable)
        try:
            return await run_flow_async(self.redis, flow), None
        except JobError as e:
            if e.code != "not_replicated":
                raise
            return e.claims, (f"the job is enqueued on the master, but no replica acknowledged it within "
                              f"{self.defaults.durable_timeout_ms} ms (WAIT 1): it exists and will run unless the "
                              "master fails before replicating it; check the replicas (INFO replication)")
