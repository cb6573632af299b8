"""A minimal asyncio HTTP/1.1 client for load generators: one POST per connection, the body read as it arrives.

bench/serve_load.py sends hundreds of concurrent requests from one Python process. With httpx2 that process
spent ~50-100 us of CPU per SSE chunk (its pool, anyio and h11 layers), so on a busy host the load generator,
not the server, could set the pace of a streamed run. This client does what the measurement needs and no
more: it writes the request, parses the status line and headers, and reads the body (Content-Length, chunked,
or to EOF), handing each piece of the body to the caller as it arrives. Plain http:// only.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class HttpError(RuntimeError):
    """A reply this client cannot read (not HTTP/1.x, a malformed chunk)."""


@dataclass(slots=True)
class Reply:
    """Status, headers (lower-case names) and, unless streamed to a callback, the body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def split_url(base_url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of an http:// base URL."""
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs: {base_url!r}")
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/")


async def post(host: str, port: int, path: str, body: bytes, on_data: Callable[[bytes], None] | None = None,
               headers: dict[str, str] | None = None) -> Reply:
    """POST `body` (JSON) on a new connection; each piece of the reply body goes to `on_data` as it arrives
    (else it is collected in Reply.body). Returns once the body is complete."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = [f"POST {path} HTTP/1.1", f"host: {host}:{port}", "content-type: application/json",
                f"content-length: {len(body)}", "connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        reply = await _read_head(reader)
        parts: list[bytes] = []
        sink = on_data or parts.append
        if reply.headers.get("transfer-encoding", "").lower() == "chunked":
            await _read_chunked(reader, sink)
        elif "content-length" in reply.headers:
            sink(await reader.readexactly(int(reply.headers["content-length"])))
        else:
            while data := await reader.read(65536):
                sink(data)
        reply.body = b"".join(parts)
        return reply
    finally:
        writer.close()


async def _read_head(reader: asyncio.StreamReader) -> Reply:
    status_line = await reader.readline()
    version, _, rest = status_line.decode("latin-1").partition(" ")
    if not version.startswith("HTTP/1."):
        raise HttpError(f"not an HTTP/1.x reply: {status_line[:80]!r}")
    reply = Reply(int(rest.split(" ", 1)[0]))
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        reply.headers[name.strip().lower()] = value.strip()
    return reply


async def _read_chunked(reader: asyncio.StreamReader, sink: Callable[[bytes], None]) -> None:
    while True:
        size_line = await reader.readline()
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HttpError(f"bad chunk size line {size_line[:80]!r}") from None
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        sink(await reader.readexactly(size))
        await reader.readexactly(2)  # the CRLF after the chunk
