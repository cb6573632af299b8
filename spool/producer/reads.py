"""Shared blocking reads: one XREAD for every token stream an AsyncClient is waiting on
(AsyncClient(shared_reads=True)).

Without it every waiting verb (result(), stream()) holds a pooled connection in a blocking XREAD of its own
stream, and every chunk of every stream costs a round trip of its own. A process waiting on hundreds of
requests at once (`spool serve`) then spends most of its CPU on round trips and on opening connections. Here
one task reads all the streams being waited on with one blocking XREAD (on one connection of its own) and
hands each waiter its entries, so a read costs one round trip however many streams it covers.

Each waiting verb holds a Subscription: its stream and the id of the last entry it has. The reader's XREAD
names every subscribed stream from the lowest id its subscriptions have, and gives each subscription the
entries after its own id, buffered until the verb reads them (a stream whose subscription holds a full read
of unread entries is left out until it drains: the entries wait in Redis, as they would for a slow verb).
A subscription made while the XREAD blocks ends it early (CLIENT UNBLOCK, on the id CLIENT ID just returned on
the reader's connection), so a new waiter's first read does not wait for the others' timeout. Where Redis
refuses CLIENT UNBLOCK (an ACL), the reader blocks at most `fallback_block_ms` instead.

Redis Cluster cannot XREAD streams of several hash slots at once: the client keeps one read per waiter there.
A read that fails (Redis away) is retried with a backoff; the waiters meanwhile see their reads time out as
if the stream were quiet, and their next ordinary round trip meets the outage with the client's own retries.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import redis

log = logging.getLogger("spool.producer")
MAX_BACKOFF_S = 1.0


def entry_key(entry_id: Any) -> tuple[int, int]:
    """A stream entry id ("ms-seq", str or bytes) as a comparable pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _entries(raw: Any) -> list[tuple[bytes, dict]]:
    """A raw XREAD stream's entries ([[id, [field, value, ...]], ...]) as (id, {field: value})."""
    out = []
    for entry in raw or []:
        if entry is None:
            continue
        entry_id, flat = entry[0], entry[1] or []
        out.append((entry_id, dict(zip(flat[::2], flat[1::2]))))
    return out


def _streams(reply: Any) -> list[tuple[str, Any]]:
    """(stream name, raw entries) pairs of a raw XREAD reply, RESP2 ([[name, entries]]) or RESP3 ({name: entries})."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else ((r[0], r[1]) for r in reply)
    return [(k.decode() if isinstance(k, bytes) else str(k), v) for k, v in pairs]


@dataclass(eq=False, slots=True)
class Subscription:
    """One waiting verb's stream: the entries the reader fetched that the verb has not read yet."""

    key: str
    last: tuple[int, int]  # the last entry id buffered (or read) for this verb
    count: int  # at most this many entries per read (and buffered before the stream is left out)
    buffer: list[tuple[bytes, dict]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    left_out: bool = False  # the reader left the stream out for a full buffer: tell it when there is room

    def take(self, after: tuple[int, int]) -> list[tuple[bytes, dict]]:
        """Buffered entries after `after` (up to count), removed from the buffer."""
        while self.buffer and entry_key(self.buffer[0][0]) <= after:
            self.buffer.pop(0)
        if self.last < after:
            self.last = after  # the verb got past the reader some other way (XRANGE after a quiet read)
        out, self.buffer = self.buffer[:self.count], self.buffer[self.count:]
        if not self.buffer:
            self.ready.clear()
        return out


class SharedReads:
    """The reader task and its subscriptions, for one asyncio Redis client (single node or Sentinel master)."""

    def __init__(self, redis_client: Any, block_ms: int, fallback_block_ms: int = 50):
        self.redis = redis_client
        self.block_ms = block_ms
        self.fallback_block_ms = fallback_block_ms
        self._subs: dict[str, set[Subscription]] = {}
        self._changed = asyncio.Event()  # a subscription came, or a full buffer drained
        self._epoch = 0  # bumped on each such change
        self._blocked_id: int | None = None  # CLIENT ID of the reader's connection while its XREAD is out
        self._read_epoch = 0  # the epoch the outstanding XREAD was built at
        self._unblocking = False
        self._can_unblock = True
        self._task: asyncio.Task | None = None
        self.reads = 0  # XREADs sent (for tests and benchmarks)

    # -- what the client calls ----------------------------------------------------------------------
    def subscribe(self, key: str, last: Any, count: int) -> Subscription:
        """Start reading `key` after entry `last` for one verb (release() it when the verb ends)."""
        sub = Subscription(key, entry_key(last), count)
        self._subs.setdefault(key, set()).add(sub)
        self._note_change()
        return sub

    def release(self, sub: Subscription) -> None:
        """The verb is done with its stream."""
        subs = self._subs.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.key]

    async def read(self, sub: Subscription, last: Any, block_ms: int) -> list:
        """Entries after `last`, waiting up to `block_ms` for one; in XREAD's reply shape ([[key, entries]],
        or [] when none came)."""
        after = entry_key(last)
        entries = self._take(sub, after)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while not entries:
            left = deadline - loop.time()
            if left <= 0:
                return []
            try:
                await asyncio.wait_for(sub.ready.wait(), left)
            except TimeoutError:
                return []
            entries = self._take(sub, after)
        return [[sub.key, entries]]

    def _take(self, sub: Subscription, after: tuple[int, int]) -> list[tuple[bytes, dict]]:
        entries = sub.take(after)
        if sub.left_out and len(sub.buffer) < sub.count:
            sub.left_out = False
            self._note_change()  # the reader may read its stream again
        return entries

    async def aclose(self) -> None:
        """Stop the reader task."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -- the reader -----------------------------------------------------------------------------------
    def _note_change(self) -> None:
        self._epoch += 1
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="spool-shared-reads")
        elif self._blocked_id is not None and self._read_epoch != self._epoch:
            self._unblock()

    def _unblock(self) -> None:
        if self._unblocking or not self._can_unblock or self._blocked_id is None:
            return
        self._unblocking = True
        asyncio.get_running_loop().create_task(self._send_unblock(self._blocked_id))

    async def _send_unblock(self, client_id: int) -> None:
        try:
            await self.redis.client_unblock(client_id)
        except redis.ResponseError as e:  # an ACL without CLIENT UNBLOCK: block briefly instead
            if self._can_unblock:
                log.warning("CLIENT UNBLOCK refused (%s): shared reads block at most %d ms", e,
                            self.fallback_block_ms)
            self._can_unblock = False
        except Exception as e:  # noqa: BLE001 - Redis away: the reader's own read fails and retries
            log.debug("CLIENT UNBLOCK failed: %s", e)

    def _wanted(self) -> dict[str, str]:
        """Each subscribed stream whose buffers have room, from the lowest id its subscriptions have."""
        streams = {}
        for key, subs in self._subs.items():
            open_subs = []
            for sub in subs:
                if len(sub.buffer) < sub.count:
                    open_subs.append(sub)
                else:
                    sub.left_out = True
            if open_subs:
                ms, seq = min(s.last for s in open_subs)
                streams[key] = f"{ms}-{seq}"
        return streams

    def _dispatch(self, reply: Any) -> None:
        for key, raw in _streams(reply):
            entries = _entries(raw)
            for sub in self._subs.get(key, ()):
                if len(sub.buffer) >= sub.count:
                    continue  # left out of this read's ids: it reads these entries again once drained
                new = [e for e in entries if entry_key(e[0]) > sub.last]
                if new:
                    sub.buffer.extend(new)
                    sub.last = entry_key(new[-1][0])
                    sub.ready.set()

    async def _run(self) -> None:
        pool = self.redis.connection_pool
        backoff = 0.0
        while True:
            streams = self._wanted()
            if not streams:
                self._changed.clear()
                if not self._subs:
                    return  # the next subscription starts a new task
                await self._changed.wait()
                continue
            conn = await pool.get_connection()
            try:
                await self._read_on(conn, streams)
                backoff = 0.0
            except asyncio.CancelledError:
                await conn.disconnect(nowait=True)  # a blocked XREAD's reply must not reach the next user
                raise
            except (redis.ConnectionError, redis.TimeoutError, OSError, redis.ResponseError) as e:
                await conn.disconnect(nowait=True)
                backoff = min(MAX_BACKOFF_S, backoff * 2 or 0.05)
                log.warning("shared stream read failed: %s (retry in %.2fs)", e, backoff)
                await asyncio.sleep(backoff)
            finally:
                self._blocked_id = None
                await pool.release(conn)

    async def _read_on(self, conn: Any, streams: dict[str, str]) -> None:
        """One XREAD of `streams` on `conn`, preceded by CLIENT ID (its reply comes at once, the XREAD's when
        an entry arrives, the block ends or CLIENT UNBLOCK cuts it short); dispatch the entries."""
        self._read_epoch, self._unblocking = self._epoch, False
        block = self.block_ms if self._can_unblock else min(self.block_ms, self.fallback_block_ms)
        count = max(s.count for subs in self._subs.values() for s in subs)
        xread = ["XREAD", "COUNT", count, "BLOCK", block, "STREAMS", *streams.keys(), *streams.values()]
        self.reads += 1
        timeout = block / 1000 + max(10.0, conn.socket_timeout or 0.0)
        if self._can_unblock:
            await conn.send_packed_command(conn.pack_commands([["CLIENT", "ID"], xread]))
            try:
                self._blocked_id = int(await conn.read_response(timeout=timeout))
            except redis.ResponseError as e:  # CLIENT ID refused: the XREAD's reply still follows
                log.warning("CLIENT ID refused (%s): shared reads block at most %d ms", e, self.fallback_block_ms)
                self._can_unblock = False
            if self._blocked_id is not None and self._read_epoch != self._epoch:
                self._unblock()  # something changed while the command was on its way
        else:
            await conn.send_command(*xread)
        reply = await conn.read_response(timeout=timeout)
        self._blocked_id = None
        self._dispatch(reply)
