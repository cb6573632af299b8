"""/v1/batches: create from an uploaded file, retrieve, list, cancel (objects shaped as openai.types.Batch).

The batch runs through spool's resumable batch machinery (spool.gateway.batch_runs), at `bulk` priority unless the
create body's extra field `priority` says `interactive`. Its output and error files are downloaded through
/v1/files once the batch is final.
"""
from __future__ import annotations

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from spool.gateway.core import gateway_of, read_json
from spool.gateway.errors import ApiError
from spool.producer.batch.format import URLS
from spool.protocol import BATCH_PRIORITY, PRIORITIES

router = APIRouter()
CREATE_FIELDS = frozenset({"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after",
                           "priority"})


def _not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"no batch with id {batch_id[:100]!r}", param="batch_id", code="batch_not_found")


@router.post("/v1/batches")
async def create(request: Request) -> dict:
    """Create a batch from an uploaded file (purpose "batch") and start it."""
    gw = gateway_of(request)
    body = await read_json(request, 64 << 10)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_request")
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise ApiError(400, f"{unknown[0]} is not a supported field", param=unknown[0], code="unsupported")
    endpoint, window, file_id = body.get("endpoint"), body.get("completion_window"), body.get("input_file_id")
    if endpoint not in URLS:
        raise ApiError(400, f"endpoint must be one of {', '.join(URLS)} on this server; got {endpoint!r}",
                       param="endpoint", code="invalid_endpoint")
    if window != "24h":
        raise ApiError(400, f"completion_window must be '24h'; got {window!r}", param="completion_window",
                       code="invalid_completion_window")
    metadata, priority = body.get("metadata"), body.get("priority") or BATCH_PRIORITY
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items())):
        raise ApiError(400, "metadata must be an object of at most 16 string values (keys <= 64, values <= 512 "
                            "characters)", param="metadata", code="invalid_metadata")
    if priority not in PRIORITIES:
        raise ApiError(400, f"priority must be one of {', '.join(PRIORITIES)}; got {priority!r}", param="priority",
                       code="invalid_priority")
    meta = await run_in_threadpool(gw.files.get, file_id) if isinstance(file_id, str) and gw.files.valid_id(
        file_id) else None
    if meta is None or meta["purpose"] != "batch":
        raise ApiError(400, f"input_file_id {file_id!r} is not an uploaded file of purpose 'batch'",
                       param="input_file_id", code="invalid_input_file")
    return await run_in_threadpool(gw.batches.create, file_id, endpoint, metadata, priority)


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None,
                       limit: int = Query(20, ge=1, le=100)) -> dict:
    """The gateway's batches, newest first, paged by `after` and `limit`."""
    items, more = await run_in_threadpool(gateway_of(request).batches.list, after, limit)
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": more}


@router.get("/v1/batches/{batch_id}")
async def retrieve(request: Request, batch_id: str) -> dict:
    """One batch: status, request counts, timestamps, output and error file ids once final."""
    info = await run_in_threadpool(gateway_of(request).batches.info, batch_id)
    if info is None:
        raise _not_found(batch_id)
    return info


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel(request: Request, batch_id: str) -> dict:
    """Cancel a batch: status cancelling while its runner winds down (a second or so), then cancelled."""
    info = await run_in_threadpool(gateway_of(request).batches.cancel, batch_id)
    if info is None:
        raise _not_found(batch_id)
    return info
