"""A fault-injecting TCP proxy for tests: put it between a worker or client and Redis, then break the network.

    proxy = FaultProxy("127.0.0.1", redis_port).start()   # clients connect to proxy.url
    proxy.latency_s = 0.05      # every chunk, each way, waits 50 ms
    proxy.stall()               # stop forwarding without closing anything; proxy.resume() delivers the backlog
    proxy.reset()               # every open connection gets a TCP RST, both sides
    proxy.vanish()              # half-open: open connections go silent for ever (never closed, nothing passes);
                                # new connections still work (the peer came back under the same address)
    proxy.close()

One asyncio loop on a daemon thread; the knobs are plain attributes and methods, safe to call from the test's
thread. A stalled connection keeps what it read and delivers it, late, on resume() even if the client has
given up on it meanwhile, as TCP does after a partition heals: a command a client already resent elsewhere
may run a second time, late. That is the case exactly-once must survive.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Link:
    """One proxied connection: the client side and the Redis side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    dead: bool = False  # vanished: swallow everything, close nothing
    tasks: list[asyncio.Task] = field(default_factory=list)


class FaultProxy:
    """Forwards 127.0.0.1:port to (host, target_port), with faults on demand."""

    def __init__(self, host: str, target_port: int):
        self.host, self.target_port = host, target_port
        self.port = 0
        self.latency_s = 0.0
        self.connections_total = 0  # connections accepted so far (reconnects show up here)
        self._links: list[_Link] = []
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0 of the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> FaultProxy:
        """Listen on a free loopback port."""
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        """Close every connection and stop listening."""
        if self._thread.is_alive():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        """Forward again, the stalled backlog first."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def reset(self) -> int:
        """Abort every open connection with a TCP RST on both sides; returns how many."""
        return self._call(self._reset())

    def vanish(self) -> int:
        """Half-open: every open connection goes silent for ever (the peer vanished without a FIN or RST)."""
        return self._call(self._vanish())

    @property
    def open_connections(self) -> int:
        """Connections open now (vanished ones included)."""
        return len(self._links)

    # -- the loop's side ----------------------------------------------------------------------------
    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.append(link)
        link.tasks = [asyncio.ensure_future(self._pump(link, reader, up_writer)),
                      asyncio.ensure_future(self._pump(link, up_reader, writer))]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        if link in self._links:
            self._links.remove(link)
        link.client.close()
        link.upstream.close()

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await self._flowing.wait()
                if link.dead:
                    continue  # the bytes vanish; the sender's side stays open and hears nothing
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                writer.write(data)
                await writer.drain()
            if not link.dead and writer.can_write_eof():
                writer.write_eof()  # pass the half-close on, after everything read before it
        except (OSError, RuntimeError):
            if not link.dead:  # one side broke: break the other too, as a real connection would
                link.client.transport.abort()
                link.upstream.transport.abort()

    async def _reset(self) -> int:
        links, self._links = self._links, []
        for link in links:
            for w in (link.client, link.upstream):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    try:  # linger 0: close() sends an RST instead of a FIN
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                w.transport.abort()
            for task in link.tasks:
                task.cancel()
        return len(links)

    async def _vanish(self) -> int:
        for link in self._links:
            link.dead = True
        return len(self._links)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        for link in list(self._links):
            for w in (link.client, link.upstream):
                w.transport.abort()
            for task in link.tasks:
                task.cancel()
        self._links = []
