"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the HTTP status that fits.

Every failure the gateway answers goes through ApiError, so clients (the openai SDK raises BadRequestError,
AuthenticationError, NotFoundError, ConflictError, RateLimitError, ... from the status) always get the shape.
"""
from __future__ import annotations

import logging
import re

import orjson
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from spool.producer.batch.format import LineError
from spool.producer.errors import RedisFullError
from spool.protocol import Result

log = logging.getLogger("spool.gateway")

INVALID = "invalid_request_error"
# A refusal the client must not retry as is: the openai SDK retries 409 (and 5xx) unless told otherwise.
NO_RETRY = {"x-should-retry": "false"}
# Result error codes that say the request itself was wrong (400); the rest are the deployment's doing.
CLIENT_CODES = frozenset({"invalid_prompt", "invalid_structured_output", "invalid_job", "invalid_json", "too_large",
                          "invalid_id", "unsupported_version", "missing_job_field"})
_PARAM_RE = re.compile(r"^(?:body\.)?([A-Za-z_][A-Za-z0-9_]*(?:(?:\.[A-Za-z0-9_]+)|(?:\[\d+\]))*)")


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = INVALID, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        """The JSON response."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return Response(orjson.dumps(body), status_code=self.status, media_type="application/json",
                        headers={**self.headers, **(extra_headers or {})})


def param_of(message: str) -> str | None:
    """The request field a validation message is about: "body.temperature ..." or "temperature: ..." -> temperature."""
    m = _PARAM_RE.match(message)
    if m is None:
        return None
    rest = message[m.end():]
    return m.group(1) if message.startswith("body.") or rest.startswith(":") else None


def bad_request(e: LineError) -> ApiError:
    """400 for a body the shared batch/HTTP parser refused; `param` names the field."""
    message = e.message.replace("body.", "")
    return ApiError(400, message, param=param_of(e.message), code=e.code)


def duplicate_id(message: str) -> ApiError:
    """409: the request id is held by another job document (the seed's request-id trap)."""
    return ApiError(409, message, param="request_id", code="duplicate_id", headers=NO_RETRY)


def from_result(res: Result) -> ApiError:
    """The error of a request that did not complete: 400 for the request's own fault, else 409/500/504."""
    code = res.error.code if res.error else res.status
    message = res.error.message if res.error else f"request {res.status}"
    if code in CLIENT_CODES:
        param = "messages" if code == "invalid_prompt" and "template" in message else None
        return ApiError(400, message, param=param, code=code, headers=NO_RETRY)
    if res.status == "cancelled":
        return ApiError(409, message, code="cancelled", headers=NO_RETRY)
    if res.status == "expired":
        return ApiError(504, message, type="timeout", code=code, headers=NO_RETRY)
    return ApiError(500, message, type="server_error", code=code)


def install(app: FastAPI) -> None:
    """Answer every error (ours, routing's, FastAPI's validation, a bug) in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return ApiError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return ApiError(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param,
                        code="invalid_request").response()

    @app.exception_handler(redis.exceptions.OutOfMemoryError)
    async def _redis_full(request: Request, exc: redis.exceptions.OutOfMemoryError) -> Response:
        # Redis at maxmemory (noeviction) refuses writes until results are collected or memory is added.
        full = exc if isinstance(exc, RedisFullError) else RedisFullError.from_error(exc)
        return ApiError(503, str(full), type="server_error", code="queue_full",
                        headers={"retry-after": "5"}).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error",
                        code="internal_error").response()
