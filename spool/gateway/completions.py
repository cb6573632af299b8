"""POST /v1/chat/completions and /v1/completions: an OpenAI request becomes one spool job.

The body goes through the same parser as a batch line (spool.producer.batch.format.parse_body) and the same job
validation as Client.enqueue; the answer is shaped from the Result by spool.producer.batch.responses, or streamed
(spool.gateway.streaming). The request id (the job id) comes back in the `x-request-id` header: `spool tail ID`,
`spool result ID` work with it. A caller may choose it (body `request_id`, vLLM's field, or an
`X-Request-Id` header): resending the same body under it is idempotent, another body under it is 409.
"""
from __future__ import annotations

import time

import orjson
import redis
from fastapi import APIRouter, Request
from starlette.responses import Response

from spool.gateway import streaming
from spool.gateway.core import ClientGone, Gateway, Watcher, gateway_of, now, read_json
from spool.gateway.errors import ApiError, bad_request, from_result
from spool.producer.batch.format import LineError, job_document, parse_body
from spool.producer.batch.responses import completion_body
from spool.protocol import DEFAULT_PRIORITY, new_id, validate_id

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI's chat completions (streamed with `stream: true`)."""
    return await complete(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI's (legacy) text completions (streamed with `stream: true`)."""
    return await complete(request, "completion")


def _header_id(request: Request) -> str | None:
    """A valid X-Request-Id header (proxies set their own, in any format: an invalid one is ignored)."""
    value = request.headers.get("x-request-id")
    try:
        return validate_id(value) if value else None
    except ValueError:
        return None


async def complete(request: Request, kind: str) -> Response:
    """Parse, admit, enqueue, then answer from the Result or stream the token events."""
    gw = gateway_of(request)
    started, created = time.perf_counter(), now()
    body = await read_json(request, 2 * gw.ctx.limits.max_job_bytes)
    try:
        parsed = parse_body(kind, body, http=True)
        gw.check_model(parsed.model)
        priority = parsed.priority or DEFAULT_PRIORITY
        rid = parsed.request_id or _header_id(request) or new_id()
        stream_key, doc = job_document(gw.ctx, parsed, id=rid, priority=priority, stream=parsed.stream)
    except LineError as e:
        gw.metrics.rejected.labels("invalid").inc()
        raise bad_request(e) from None
    headers = {"x-request-id": rid}
    watcher = Watcher(request)
    try:
        await gw.admit(priority, watcher)
        await gw.enqueue(rid, stream_key, doc, priority)
        if parsed.stream:
            return await streaming.respond(gw, parsed, rid, created, started, watcher, headers)
        res = await watcher.race(gw.client.result(rid, timeout=gw.settings.request_timeout_s))
    except ClientGone:
        gw.metrics.disconnects.inc()
        await _cancel_quietly(gw, rid)
        return Response(status_code=499, headers=headers)  # nobody reads it; logs and metrics do
    except TimeoutError:
        await _cancel_quietly(gw, rid)
        raise ApiError(504, f"no result within {gw.settings.request_timeout_s:g}s; the job was cancelled",
                       type="timeout", code="timeout", headers={**headers, "x-should-retry": "false"}) from None
    except ApiError as e:
        e.headers.update(headers)
        raise
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise ApiError(503, f"Redis is unreachable: {e}", type="server_error", code="redis_unavailable",
                       headers=headers) from None
    finally:
        watcher.close()
    if res.status != "completed":
        err = from_result(res)
        err.headers.update(headers)
        raise err
    return Response(orjson.dumps(completion_body(kind, rid, parsed.model, res, parsed.top_logprobs)),
                    media_type="application/json", headers=headers)


async def _cancel_quietly(gw: Gateway, rid: str) -> None:
    try:
        await gw.cancel(rid)
    except (redis.ConnectionError, redis.TimeoutError):
        pass  # Redis away: the job runs to its end and its result waits under the request id
