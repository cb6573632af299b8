"""A multipart/form-data upload (POST /v1/files) streamed straight into the files directory, with a size limit.

Starlette's own form parser spools files to a temporary directory first; here the `file` part's bytes go to
their final directory as they arrive and the upload stops at --max-file-bytes, so an upload costs neither
memory nor a second copy on disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from spool.gateway.errors import ApiError

MAX_FIELD_BYTES = 64 << 10  # the form's other fields (purpose, expires_after[...]) are short


@dataclass(slots=True)
class Upload:
    """What a form held: its text fields, and the one file (its name, where its bytes are, their count)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    path: Path | None = None
    size: int = 0


class _Parser:
    def __init__(self, dest: Path, limit: int):
        self.dest, self.limit, self.upload = dest, limit, Upload()
        self.out = None
        self.header_name, self.header_value = b"", b""
        self.disposition = b""
        self.name: str | None = None
        self.value = bytearray()
        self.is_file = False

    def on_part_begin(self) -> None:
        self.disposition, self.name, self.is_file, self.value = b"", None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise ApiError(400, "a form part has no name", code="invalid_multipart")
        self.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self.upload.path is not None:
                raise ApiError(400, "upload one file per request", param="file", code="invalid_multipart")
            self.is_file = True
            self.upload.filename = options[b"filename"].decode("utf-8", "replace")
            self.upload.path = self.dest
            self.out = open(self.dest, "wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self.is_file:
            self.value += data[start:end]
            if len(self.value) > MAX_FIELD_BYTES:
                raise ApiError(413, f"form field {self.name!r} is too long", param=self.name, code="too_large")
            return
        self.upload.size += end - start
        if self.upload.size > self.limit:
            raise ApiError(413, f"the file is larger than this server's limit of {self.limit} bytes "
                                "(spool serve --max-file-bytes)", param="file", code="file_too_large")
        self.out.write(data[start:end])

    def on_part_end(self) -> None:
        if self.is_file:
            self.out.close()
            self.out = None
        elif self.name is not None:
            self.upload.fields[self.name] = self.value.decode("utf-8", "replace")

    def close(self) -> None:
        if self.out is not None:
            self.out.close()


async def receive_upload(request: Request, dest: Path, limit: int) -> Upload:
    """Parse the request's multipart form; the file part is written to `dest` (removed again on any error)."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        raise ApiError(400, "upload with Content-Type multipart/form-data (fields: file, purpose)",
                       code="invalid_multipart")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 2 * MAX_FIELD_BYTES:
        raise ApiError(413, f"the upload is {declared} bytes; this server's limit is {limit} bytes per file "
                            "(spool serve --max-file-bytes)", param="file", code="file_too_large")
    p = _Parser(dest, limit)
    callbacks = {name: getattr(p, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end",
        "on_headers_finished")}
    parser = MultipartParser(options[b"boundary"], callbacks)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        p.close()
        dest.unlink(missing_ok=True)
        raise ApiError(400, f"invalid multipart form: {e}", code="invalid_multipart") from None
    except BaseException:
        p.close()
        dest.unlink(missing_ok=True)
        raise
    p.close()
    return p.upload
