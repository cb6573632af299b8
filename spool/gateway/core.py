"""What every route shares: the settings, the async Redis client, the deployment's state, admission checks
(model 404, backlog 429, no worker 503), the idempotent enqueue (409 on duplicate_id) and client-disconnect
watching."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request

from spool.gateway.batch_runs import BatchManager
from spool.gateway.deployment import Deployment, model_aliases
from spool.gateway.enqueuer import Enqueuer
from spool.gateway.errors import ApiError, duplicate_id
from spool.gateway.filestore import FileStore
from spool.gateway.metrics import Metrics
from spool.gateway.settings import GatewaySettings
from spool.producer import AsyncClient, ops
from spool.protocol import JobError
from spool.protocol.commands import DUPLICATE_ID, ENQUEUED, duplicate_id_message


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class Watcher:
    """Notices a client disconnecting while its request waits (http.disconnect on the ASGI receive channel)."""

    def __init__(self, request: Request):
        self.request = request
        self._task: asyncio.Task | None = None

    def _listening(self) -> asyncio.Task:
        if self._task is None:
            self._task = asyncio.ensure_future(self._listen())
        return self._task

    async def _listen(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    async def gone(self) -> bool:
        """True once the client has disconnected."""
        return self._listening().done()

    async def race(self, awaitable: Any) -> Any:
        """Await `awaitable`, or raise ClientGone (cancelling it) if the client disconnects first."""
        work = asyncio.ensure_future(awaitable)
        listening = self._listening()
        await asyncio.wait({work, listening}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientGone

    def close(self) -> None:
        """Stop listening (a streamed response listens on its own from here on)."""
        if self._task is not None:
            self._task.cancel()


@dataclass(slots=True)
class Gateway:
    """One gateway process: its settings and connections; `app.state.gateway` of the FastAPI app."""

    settings: GatewaySettings
    client: AsyncClient
    deployment: Deployment
    metrics: Metrics
    files: FileStore
    batches: BatchManager
    started: int
    enqueuer: Enqueuer

    @property
    def ctx(self) -> ops.Context:
        """Keys, limits and defaults (shared with the producer library)."""
        return self.client.ctx

    @property
    def redis(self):
        """The asyncio Redis client (one pool for every request)."""
        return self.client.redis

    def allowed_models(self) -> set[str] | None:
        """Names a request may ask for: --served-model-name, else the live workers' models; None: unknown yet."""
        if self.settings.served_model_names:
            return set(self.settings.served_model_names)
        names = {a for m in self.deployment.models() for a in model_aliases(m)}
        return names or None

    def check_model(self, model: str) -> None:
        """404 in OpenAI's shape for a model nobody serves."""
        allowed = self.allowed_models()
        if allowed is not None and model not in allowed:
            self.metrics.rejected.labels("unknown_model").inc()
            raise ApiError(404, f"the model {model!r} does not exist; served: {', '.join(sorted(allowed))}",
                           param="model", code="model_not_found")

    async def admit(self, priority: str, watcher: Watcher) -> None:
        """429 when the priority's stream is over --max-backlog; 503 when no worker shows up in time."""
        s, d = self.settings, self.deployment
        if s.max_backlog and d.backlog.get(priority, 0) >= s.max_backlog:
            self.metrics.rejected.labels("backlog").inc()
            raise ApiError(429, f"the {priority} queue holds {d.backlog[priority]} jobs (limit {s.max_backlog}); "
                                "retry later", type="rate_limit_error", code="queue_full",
                           headers={"retry-after": str(s.retry_after_s)})
        if not d.workers and not await d.wait_for_worker(s.no_worker_timeout_s, watcher.gone):
            if await watcher.gone():
                raise ClientGone
            self.metrics.rejected.labels("no_worker").inc()
            raise ApiError(503, f"no live worker on this deployment within {s.no_worker_timeout_s:g}s; "
                                "start one with `spool worker --model DIR`", type="server_error", code="no_worker",
                           headers={"retry-after": str(s.retry_after_s)})

    async def enqueue(self, rid: str, stream_key: str, doc: bytes, priority: str) -> None:
        """The ENQUEUE script, as Client.enqueue sends it (with the other requests' enqueues of the moment: see
        spool/gateway/enqueuer.py): a resend of the same document is idempotent; 409 when another document holds the
        id."""
        try:
            reply = await self.enqueuer.enqueue(rid, stream_key, doc)
        except JobError as e:
            if e.code != "not_replicated":
                raise
            # The job is on the master and will run; the client may resend with the same X-Request-Id (idempotent).
            raise ApiError(503, e.message, type="server_error", code="not_replicated",
                           headers={"retry-after": str(self.settings.retry_after_s), "x-request-id": rid}) from None
        if reply == DUPLICATE_ID:
            self.metrics.rejected.labels("duplicate_id").inc()
            raise duplicate_id(duplicate_id_message(rid))
        if reply == ENQUEUED:
            self.deployment.note_enqueued(priority)

    async def cancel(self, rid: str) -> None:
        """Cancel a job whose client left (the worker frees its KV cache within a step)."""
        await self.client.cancel(rid)


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 past `limit` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="too_large")
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None


def now() -> int:
    """Unix seconds, for `created` fields."""
    return int(time.time())


def gateway_of(request) -> Gateway:
    """The Gateway the app serves (set on app.state at start-up)."""
    return request.app.state.gateway
