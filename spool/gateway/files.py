"""/v1/files: upload (purpose "batch"), list, retrieve, content, delete; batch outputs appear here too."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, Response

from spool.gateway.core import gateway_of
from spool.gateway.errors import ApiError
from spool.gateway.upload import receive_upload

router = APIRouter()
UPLOAD_PURPOSES = ("batch",)  # what this server can do with a file; OpenAI's other purposes are refused


def _not_found(file_id: str) -> ApiError:
    return ApiError(404, f"no file with id {file_id[:80]!r}", param="file_id", code="file_not_found")


@router.post("/v1/files")
async def upload(request: Request) -> dict:
    """Store an uploaded file (multipart fields `file` and `purpose`); returns its file object."""
    gw = gateway_of(request)
    tmp = gw.files.temp_path()
    form = await receive_upload(request, tmp, gw.settings.max_file_bytes)
    try:
        if form.path is None:
            raise ApiError(400, "the form has no file part", param="file", code="missing_file")
        purpose = form.fields.get("purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise ApiError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)} on this server; got "
                                f"{purpose!r}", param="purpose", code="invalid_purpose")
        return await run_in_threadpool(gw.files.commit, tmp, form.filename or "upload.jsonl", purpose)
    finally:
        tmp.unlink(missing_ok=True)  # committed files were renamed away


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                     limit: int = Query(10_000, ge=1, le=10_000), order: Literal["asc", "desc"] = "desc") -> dict:
    """File objects, newest first (order=asc: oldest first), paged by `after` and `limit`."""
    items, more = await run_in_threadpool(gateway_of(request).files.list, purpose, after, limit, order)
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": more}


@router.get("/v1/files/{file_id}")
async def retrieve(request: Request, file_id: str) -> dict:
    """One file object."""
    meta = await _meta(request, file_id)
    return meta


@router.get("/v1/files/{file_id}/content")
async def content(request: Request, file_id: str) -> Response:
    """The file's bytes."""
    meta = await _meta(request, file_id)
    path = gateway_of(request).files.data_path(meta["id"])
    return FileResponse(path, media_type="application/octet-stream", filename=meta["filename"])


@router.delete("/v1/files/{file_id}")
async def delete(request: Request, file_id: str) -> dict:
    """Remove a file; the input file of a batch that is still running cannot be removed."""
    gw = gateway_of(request)
    await _meta(request, file_id)
    running = await run_in_threadpool(gw.batches.running_with_input, file_id)
    if running:
        raise ApiError(409, f"file {file_id} is the input of batch {running}, which is still running; cancel it "
                            "first", param="file_id", code="file_in_use", headers={"x-should-retry": "false"})
    await run_in_threadpool(gw.files.delete, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


async def _meta(request: Request, file_id: str) -> dict:
    gw = gateway_of(request)
    if not gw.files.valid_id(file_id):
        raise _not_found(file_id)
    meta = await run_in_threadpool(gw.files.get, file_id)
    if meta is None:
        raise _not_found(file_id)
    return meta
