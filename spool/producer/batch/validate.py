"""The first pass over a batch file: every line checked before anything is enqueued, duplicates found in Redis."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from spool.producer import ops
from spool.producer.batch.format import LineError, cid_key, parse_line
from spool.producer.batch.state import TMP_TTL_S, BatchStore
from spool.protocol.commands import cmd, execute

CHUNK = 1000  # lines per pipelined round trip to the seen-set
KEEPALIVE_LINES = 2048  # refresh the runner's lock this often while reading a long file


class BatchInvalid(ValueError):
    """The input has invalid lines and --skip-invalid was not given: nothing was enqueued."""

    def __init__(self, batch_id: str, errors: list[dict], count: int):
        super().__init__(f"batch {batch_id}: {count} invalid line(s); first: line {errors[0]['line']}: "
                         f"{errors[0]['code']}: {errors[0]['message']}")
        self.batch_id, self.errors, self.count = batch_id, errors, count


class BatchBusy(RuntimeError):
    """Another live runner holds the batch (or took it over)."""


class BatchMismatch(RuntimeError):
    """The batch id is known with another input file, or the input changed while running."""


class Validation(NamedTuple):
    """What the first pass found: counts, invalid line numbers, the first errors, the file's sha256."""

    valid: int
    invalid: set[int]
    errors: list[dict]
    sha256: str
    endpoint: str  # the OpenAI endpoint of the valid lines (chat completions if they mix)


def validate(store: BatchStore, ctx: ops.Context, path: Path, batch_id: str, default_max_tokens: int | None,
             max_errors: int, keepalive: Callable[[], None]) -> Validation:
    """Parse every line; duplicates are found with a temporary Redis set, so memory does not grow with the file."""
    sha, invalid, errors, valid, kinds = hashlib.sha256(), set(), [], 0, set()
    seen_key, chunk = store.seen_key(batch_id), []
    store.redis.delete(seen_key)

    def reject(n: int, e: LineError) -> None:
        invalid.add(n)
        if len(errors) < max_errors:
            errors.append({"line": n, "code": e.code, "message": e.message, "custom_id": e.custom_id})

    def dedupe() -> int:
        # SADD answers 0 for a custom_id already seen (earlier in this chunk too: a pipeline runs in order).
        added = execute(store.redis, [cmd("sadd", seen_key, k) for _, _, k in chunk] +
                        [cmd("expire", seen_key, TMP_TTL_S)], False)[:-1]
        for (n, cid, _), new in zip(chunk, added):
            if not new:
                reject(n, LineError("duplicate_custom_id", f"custom_id {cid!r} is used by an earlier line", cid))
        chunk.clear()
        return sum(map(bool, added))

    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            sha.update(raw)
            if n % KEEPALIVE_LINES == 0:
                keepalive()
            line = raw.strip()
            if not line:
                continue
            try:
                req = parse_line(ctx, line, n, batch_id, default_max_tokens)
            except LineError as e:
                reject(n, e)
                continue
            kinds.add(req.kind)
            chunk.append((n, req.custom_id, cid_key(req.custom_id)))
            if len(chunk) >= CHUNK:
                valid += dedupe()
    if chunk:
        valid += dedupe()
    store.redis.delete(seen_key)
    errors.sort(key=lambda e: e["line"])
    endpoint = "/v1/completions" if kinds == {"completion"} else "/v1/chat/completions"
    return Validation(valid, invalid, errors, sha.hexdigest(), endpoint)
