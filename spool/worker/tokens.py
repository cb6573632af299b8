"""Live token events of running jobs: coalesced deltas as the engine produces them, and restart markers.

A request's deltas accumulate here and are written at most once per `interval_s` (one APPEND per request:
one entry per choice with new output), so a streamed token costs Redis a fraction of a command instead of
a script call per step. The first output of a run is written at once (time to first token does not grow),
and a request's last deltas are written right before its final result, in the same transaction. The
stream's TTL is refreshed every `ttl_refresh_s`, not per write (spool.protocol.scripts.APPEND sets it on a run's
first write and whenever a write creates the stream, so the key expires even if this worker dies).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from spool.protocol import Defaults, Keys, TokenEvent, TokenLogprob
from spool.protocol.scripts import APPEND
from spool.worker.inflight import InFlight
from spool.worker.outbox import Outbox

TTL_REFRESH_CAP_S = 10.0  # a live stream's TTL is refreshed at most this often (and at least 4 times per TTL)


@dataclass(slots=True)
class _Pending:
    """One choice's output not written yet."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] | None = None


@dataclass(slots=True)
class _Stream:
    """What the writer knows about one running request's token stream."""

    inf: InFlight
    pending: dict[int, _Pending] = field(default_factory=dict)  # choice index -> unwritten output
    written_at: float | None = None  # monotonic time of the last delta write; None: no delta written yet
    ttl_due: float = 0.0  # monotonic time from which the next write refreshes the TTL (0: the run's first)


class TokenStreamWriter:
    """Queues token-stream writes on the Outbox; they leave with the step's other writes.

    Each event carries its run and position (spool.protocol.scripts.APPEND), so a transaction sent twice appends
    nothing new, and a run that lost the job to another worker writes nothing into the other run's stream.
    """

    def __init__(self, outbox: Outbox, keys: Keys, defaults: Defaults, interval_ms: int = 0):
        self.outbox, self.keys, self.defaults = outbox, keys, defaults
        self.interval_s = max(0, interval_ms) / 1000
        self.ttl_refresh_s = min(TTL_REFRESH_CAP_S, defaults.tokens_ttl_s / 4)
        self._streams: dict[str, _Stream] = {}  # request id -> its stream state (streamed jobs only)
        self.writes = 0  # APPEND calls queued (for benchmarks and tests)

    def delta(self, inf: InFlight, index: int, text: str, token_ids: list[int],
              logprobs: list[list[TokenLogprob]] | None = None) -> None:
        """New output of choice `index`: kept until the request's next write (flush, finish)."""
        st = self._streams.get(inf.id)
        if st is None or st.inf is not inf:
            st = self._streams[inf.id] = _Stream(inf)
        p = st.pending.get(index)
        if p is None:
            p = st.pending[index] = _Pending()
        if text:
            p.text.append(text)
        p.token_ids.extend(token_ids)
        if logprobs:
            if p.logprobs is None:
                p.logprobs = []
            p.logprobs.extend(logprobs)

    def flush(self, now: float | None = None) -> None:
        """Write every request whose interval has passed since its last write (or that has written nothing)."""
        now = time.monotonic() if now is None else now
        gone = []
        for rid, st in self._streams.items():
            if st.inf.superseded:
                gone.append(rid)  # another worker owns the job: its buffered output is never written
            elif st.pending and (st.written_at is None or now - st.written_at >= self.interval_s):
                self._write(st, now)
        for rid in gone:
            del self._streams[rid]

    def finish(self, inf: InFlight) -> None:
        """The request is final: write what it has not written yet (queued before its final result)."""
        st = self._streams.pop(inf.id, None)
        if st is not None and st.pending and not inf.superseded:
            self._write(st, time.monotonic())

    def forget(self, rid: str) -> None:
        """Drop a request's state and unwritten output (its run was superseded)."""
        self._streams.pop(rid, None)

    def restart(self, inf: InFlight, reason: str) -> None:
        """Tell tailers to drop partial output; this run takes the stream over (unless the job is final)."""
        st = self._streams.get(inf.id)
        if st is None or st.inf is not inf:
            st = self._streams[inf.id] = _Stream(inf)
        self._append(st, [TokenEvent.restart(reason).to_fields()], time.monotonic(), takeover=True,
                     droppable=False)

    def _write(self, st: _Stream, now: float) -> None:
        events = [TokenEvent.delta_fields(i, "".join(p.text), p.token_ids, p.logprobs)
                  for i, p in st.pending.items()]
        st.pending = {}
        st.written_at = now
        self._append(st, events, now, takeover=False, droppable=True)

    def _append(self, st: _Stream, events: list[dict[str, bytes]], now: float, takeover: bool,
                droppable: bool) -> None:
        inf, d = st.inf, self.defaults
        refresh = now >= st.ttl_due
        if refresh:
            st.ttl_due = now + self.ttl_refresh_s
        first = inf.seq + 1
        inf.seq += len(events)
        argv: list = [inf.run, first, d.tokens_maxlen, d.tokens_ttl_s, int(takeover), int(refresh)]
        for fields in events:
            argv.append(fields["type"])
            argv.append(fields["data"])
        self.outbox.add_script(APPEND, [self.keys.result(inf.id), self.keys.tokens(inf.id)], argv,
                               droppable=droppable, on_shed=inf.mark_stream_gap if droppable else None)
        self.writes += 1
