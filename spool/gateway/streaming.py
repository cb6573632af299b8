"""`stream: true`: server-sent events read from the job's token stream (Redis), shaped by spool.gateway.chunks.

The response starts only once the job's first event is in: a job that fails before producing anything (a
prompt too long for the model, say) is answered with a plain HTTP error, not a stream holding one. From then
on a failure is an `data: {"error": ...}` event (the openai SDK raises it). A client that disconnects has its
job cancelled.

The token stream is read with blocking XREADs of many entries at once, one XREAD for every request of this
process waiting at that moment (AsyncClient's shared reads, spool/producer/reads.py); each entry (the worker
coalesces a request's tokens over its stream interval) becomes one chunk, and the chunks of one read leave in
one write.
A response silent for `keepalive_s` gets a `: ping` comment, also before its first event (a job waiting in a
backlog), which then starts the response.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import anyio
import orjson
import redis
from starlette.responses import StreamingResponse

from spool.gateway.chunks import ChunkShaper, StreamDiverged
from spool.gateway.core import Gateway, Watcher
from spool.gateway.errors import ApiError, from_result
from spool.producer.batch.format import Body
from spool.protocol import TokenEvent

log = logging.getLogger("spool.gateway")
DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"  # an SSE comment: keeps a silent response alive through proxies
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # nginx: do not buffer the stream


def sse(obj: dict) -> bytes:
    """One server-sent event."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(err: ApiError) -> bytes:
    """An error inside a stream, in OpenAI's error shape."""
    return sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})


async def respond(gw: Gateway, parsed: Body, rid: str, created: int, started: float, watcher: Watcher,
                  headers: dict[str, str]) -> StreamingResponse:
    """Wait for the job's first events (ClientGone / TimeoutError propagate), then stream the rest.

    A job silent for `keepalive_s` before its first event (queued behind a backlog) gets its response started
    anyway, with a `: ping` comment, so that proxies and clients with idle timeouts keep waiting.
    """
    batches = gw.client.stream_batches(rid, timeout=gw.settings.request_timeout_s)
    keepalive = gw.settings.keepalive_s
    waited_since = time.monotonic()
    try:
        while True:
            first = await watcher.race(batches.__anext__())
            if first:
                break
            if keepalive and time.monotonic() - waited_since >= keepalive:
                break  # start the response: from here a failure is an error event, not an HTTP status
        if first and first[0].type == "done" and first[0].status != "completed":
            res = await gw.client.result(rid, timeout=10)
            raise from_result(res)
    except BaseException:
        await batches.aclose()
        raise
    watcher.close()  # from here StreamingResponse listens for the disconnect and cancels the body
    n = parsed.job.get("n") or 1
    tools = bool(parsed.job.get("tools")) and parsed.job.get("tool_choice") != "none"
    shaper = ChunkShaper(parsed.kind, rid, parsed.model, created, n, parsed.top_logprobs, parsed.include_usage, tools)
    body = _body(gw, shaper, rid, first, batches, started)
    return StreamingResponse(body, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


async def _body(gw: Gateway, shaper: ChunkShaper, rid: str, first: list[TokenEvent],
                batches: AsyncIterator[list[TokenEvent]], started: float) -> AsyncIterator[bytes]:
    """The SSE body: one event per chunk, every chunk of one Redis read written at once."""
    finished, client_left, opened = False, True, False
    keepalive = gw.settings.keepalive_s
    try:
        batch = first
        if not batch:
            yield PING  # the job is still silent after keepalive_s: start the response now
        sent_at = time.monotonic()
        while True:
            out: list[bytes] = []
            if batch and not opened:
                out.extend(sse(chunk) for chunk in shaper.start())
                opened = True
            for event in batch:
                if event.type == "restart":
                    shaper.restart()
                elif event.type == "delta":
                    out.extend(sse(chunk) for chunk in shaper.delta(event))
                    if shaper.sent_content and started:
                        gw.metrics.ttft.observe(time.perf_counter() - started)
                        started = 0.0
                else:  # done: the result is set
                    res = await gw.client.result(rid, timeout=10)
                    if res.status != "completed":
                        out.append(error_event(from_result(res)))
                    else:
                        out.extend(sse(chunk) for chunk in shaper.finish(res))
                        out.append(DONE)
                    finished = True
                    yield b"".join(out)
                    return
            now = time.monotonic()
            if out:
                yield b"".join(out)
                sent_at = now
            elif keepalive and now - sent_at >= keepalive:
                yield PING  # an SSE comment: clients ignore it, proxies see traffic
                sent_at = now
            batch = await batches.__anext__()
    except StreamDiverged as e:
        client_left = False
        log.warning("request %s: %s; ending its stream", rid, e)
        yield error_event(ApiError(500, f"{e} (the job was restarted on another worker after a crash)",
                                   type="server_error", code="restart_diverged"))
    except (redis.ConnectionError, redis.TimeoutError) as e:
        client_left = False
        yield error_event(ApiError(503, f"Redis is unreachable: {e}", type="server_error", code="redis_unavailable"))
    except TimeoutError:
        client_left = False
        yield error_event(ApiError(504, f"no result within {gw.settings.request_timeout_s:g}s", type="timeout",
                                   code="timeout"))
    finally:
        with anyio.CancelScope(shield=True):  # the client may be gone: this must still reach Redis
            await batches.aclose()
            if not finished:
                if client_left:
                    gw.metrics.disconnects.inc()
                try:
                    await gw.cancel(rid)
                except Exception as e:  # noqa: BLE001 - Redis away: the job runs to its end instead
                    log.warning("request %s: could not cancel after the client left: %s", rid, e)
