"""A history checker for fault runs: record what clients saw, then check the exactly-once invariants.

Record every client-visible event of a run (an enqueue the client saw acknowledged, the token events a
tailer read, the results it read), then `check()` it against what Redis holds at the end:

- every acknowledged enqueue has exactly one final result, and its stream at most one `done`;
- nothing follows `done` in a token stream;
- no two runs are mixed: a run's events follow each other, and a new run starts with a `restart`;
- a streamed job's stream after its last `restart` equals its result (text and token ids, every choice),
  in Redis and in what each tailer read;
- no job the caller calls healthy was dead-lettered or failed as poison_job.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from spool.protocol import Keys, Result, TokenEvent
from spool.protocol.commands import as_str, entry_field


@dataclass(slots=True)
class History:
    """Client-visible events of a run; safe to record from several threads."""

    enqueued: dict[str, bool] = field(default_factory=dict)  # id -> streamed
    tails: dict[str, list[list[TokenEvent]]] = field(default_factory=lambda: defaultdict(list))
    results: dict[str, list[Result]] = field(default_factory=lambda: defaultdict(list))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acknowledged(self, id: str, streamed: bool = False) -> None:
        """An enqueue returned to its caller."""
        with self._lock:
            self.enqueued[id] = streamed

    def tailed(self, id: str, events: list[TokenEvent]) -> None:
        """What one tailer read from a token stream, in order."""
        with self._lock:
            self.tails[id].append(list(events))

    def read(self, result: Result) -> None:
        """A result a client read."""
        with self._lock:
            self.results[result.id].append(result)


def _stream_entries(r: redis.Redis, key: str) -> list[tuple[str | None, TokenEvent]]:
    """(run, event) of every entry of a token stream."""
    out = []
    for entry_id, fields in r.xrange(key):
        run = entry_field(fields, "run")
        out.append((as_str(run) if run is not None else None, TokenEvent.from_fields(fields, entry_id)))
    return out


def _after_last_restart(events: list[TokenEvent]) -> list[TokenEvent]:
    starts = [i for i, e in enumerate(events) if e.type == "restart"]
    return events[starts[-1] + 1:] if starts else events


def _output(events: list[TokenEvent]) -> dict[int, tuple[str, list[int]]]:
    """Per choice: text and token ids of the deltas of the last run."""
    text: dict[int, list[str]] = defaultdict(list)
    ids: dict[int, list[int]] = defaultdict(list)
    for e in _after_last_restart(events):
        if e.type == "delta":
            text[e.index].append(e.text)
            ids[e.index].extend(e.token_ids)
    return {i: ("".join(text[i]), ids[i]) for i in text}


def _expected(result: Result) -> dict[int, tuple[str, list[int]]]:
    return {c.index: (c.text, c.token_ids) for c in result.choices if c.token_ids}


def check(history: History, r: redis.Redis, keys: Keys, healthy: set[str] | None = None) -> list[str]:
    """Every violation of the invariants (empty: the run was exactly-once)."""
    problems: list[str] = []
    healthy = set(history.enqueued) if healthy is None else healthy
    # A duplicate_id dead letter is another document that tried to reuse the id: no verdict on this job.
    dead_ids = {as_str(entry_field(f, "id") or b"") for _, f in r.xrange(keys.dead)
                if not as_str(entry_field(f, "reason") or b"").startswith("duplicate_id")}
    for id, streamed in sorted(history.enqueued.items()):
        raw = r.get(keys.result(id))
        if raw is None:
            problems.append(f"{id}: acknowledged but no final result")
            continue
        result = Result.from_json(raw)
        if any(seen.model_dump() != result.model_dump() for seen in history.results.get(id, [])):
            problems.append(f"{id}: a client read another result than the one in Redis")
        if id in healthy and (id in dead_ids or (result.error is not None and result.error.code == "poison_job")):
            problems.append(f"{id}: a healthy job was dead-lettered or condemned as poison")
        entries = _stream_entries(r, keys.tokens(id))
        events = [e for _, e in entries]
        dones = [i for i, e in enumerate(events) if e.type == "done"]
        if len(dones) > 1:
            problems.append(f"{id}: {len(dones)} done events")
        if dones and dones[0] != len(events) - 1:
            problems.append(f"{id}: {len(events) - 1 - dones[0]} entries after done")
        current = None  # the run that owns the stream: set by a restart, or by the first delta
        for run, event in entries:
            if event.type == "restart":
                current = run
            elif event.type == "delta":
                if current is not None and run != current:
                    problems.append(f"{id}: entries of two runs mixed ({current} then {run} without a restart)")
                    break
                current = run
        if streamed and events and _output(events) != _expected(result):
            problems.append(f"{id}: the stream after its last restart differs from the result")
        for n, tail in enumerate(history.tails.get(id, [])):
            if tail and tail[-1].type == "done" and _output(tail) != _expected(result):
                problems.append(f"{id}: tailer {n} read a stream that differs from the result")
    return problems


def summary(problems: list[str], limit: int = 10) -> str:
    """The first problems, one a line, for an assertion message."""
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n".join(problems[:limit]) + more


def stream_runs(r: redis.Redis, keys: Keys, id: str) -> list[dict[str, Any]]:
    """The raw entries of a token stream as dicts (for debugging a failed check)."""
    return [{"run": run, **orjson.loads(event.model_dump_json())} for run, event in _stream_entries(r, keys.tokens(id))]
