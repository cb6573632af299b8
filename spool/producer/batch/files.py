"""Batch files: stream the input, append output lines durably, and read back what a previous run wrote."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from spool.producer.batch.format import cid_key, parse_record_id


class OutputError(RuntimeError):
    """An output file that cannot be resumed: corrupt, or written by another batch."""


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, stripped bytes) of each non-blank line, read streaming."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if line:
                yield n, line


@dataclass(slots=True)
class RequestCounts:
    """A batch's requests by outcome (total and invalid known after validation), and tokens generated."""

    total: int = 0
    invalid: int = 0
    completed: int = 0
    failed: int = 0
    tokens: int = 0


@dataclass(slots=True)
class Written(RequestCounts):
    """What the output files already hold: the resume point of a batch (counts of what they hold)."""

    batch_id: str | None = None
    written: int = 0  # request lines (custom_ids) already written
    rejected_lines: set[int] = field(default_factory=set)  # input lines written as validation errors


def scan_outputs(paths: list[Path], batch_id: str | None,
                 sink: Callable[[list[bytes]], None] | None = None, chunk: int = 1000) -> Written:
    """Read OUT (and ERR) once, handing the cid_key of each written custom_id to `sink` in chunks (so memory
    stays flat); a torn last line (crash mid-write) is cut off so the file ends cleanly."""
    w, keys = Written(batch_id=batch_id), []
    for path in dict.fromkeys(paths):  # OUT and ERR may be the same file
        if not path.exists():
            continue
        _cut_torn_tail(path)
        for n, raw in iter_lines(path):
            try:
                rec = orjson.loads(raw)
                owner = parse_record_id(rec.get("id"))
            except (orjson.JSONDecodeError, AttributeError):
                raise OutputError(f"{path}:{n} is not an output line of a spool batch") from None
            if owner is None:
                raise OutputError(f"{path}:{n} was not written by a spool batch (id {rec.get('id')!r})")
            if w.batch_id is None:
                w.batch_id = owner[0]
            elif owner[0] != w.batch_id:
                raise OutputError(f"{path} holds output of batch {owner[0]!r}, not {w.batch_id!r}: "
                                  "resume that batch with its --id, or write to another file")
            if owner[1] is not None:
                w.rejected_lines.add(owner[1])
            else:
                w.written += 1
                keys.append(cid_key(rec["custom_id"]))
                if len(keys) >= chunk and sink is not None:
                    sink(keys)
                    keys = []
            if rec.get("error") is None:
                w.completed += 1
                w.tokens += rec["response"]["body"]["usage"]["completion_tokens"]
            else:
                w.failed += 1
    if keys and sink is not None:
        sink(keys)
    return w


def detect_batch_id(paths: list[Path]) -> str | None:
    """The batch id recorded in the first line of OUT or ERR, if any."""
    for path in paths:
        if path.exists():
            for _, raw in iter_lines(path):
                try:
                    owner = parse_record_id(orjson.loads(raw).get("id"))
                except (orjson.JSONDecodeError, AttributeError):
                    owner = None
                return owner[0] if owner else None
    return None


def _cut_torn_tail(path: Path) -> None:
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline: everything after it is a line we never finished writing.
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(pos - step + nl + 1)
                return
            pos -= step
        f.truncate(0)


class LineWriter:
    """Append-only JSONL writer: every line is flushed when written, fsynced every `fsync_every` lines."""

    def __init__(self, path: Path, fsync_every: int = 100):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "ab")
        self.fsync_every, self.unsynced = fsync_every, 0

    def write(self, record: dict) -> None:
        """Write one record as one line (a single write call, so a crash tears at most this line)."""
        self.f.write(orjson.dumps(record) + b"\n")
        self.f.flush()
        self.unsynced += 1
        if self.unsynced >= self.fsync_every:
            self.sync()

    def sync(self) -> None:
        """Make every written line durable."""
        if self.unsynced:
            os.fsync(self.f.fileno())
            self.unsynced = 0

    def close(self) -> None:
        """fsync and close."""
        if not self.f.closed:
            self.sync()
            self.f.close()
