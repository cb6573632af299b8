"""Conditional writes that make "exactly one final result per request id" hold whatever crashes and retries.

Two workers can run the same job: a reclaim from a worker that only stalled, a producer that sent one id
twice, a transaction re-sent after its reply was lost. So the final write is a compare-and-set run inside
Redis: the first final result wins (SET NX) and only the winner appends the `done` entry and clears the
status; a later one changes nothing and is counted in the stats hash (`duplicate_finals`). A `restart`
entry is appended only while no final result exists, so it can never follow `done`.

The scripts go out as EVAL with their text, never EVALSHA: Redis forgets cached scripts when it restarts,
and an EVALSHA queued in the outbox would then fail with NOSCRIPT and lose a result.
"""
from __future__ import annotations

from typing import Any

# KEYS: result, tokens, status, stats. ARGV: result JSON, result TTL, tokens MAXLEN, tokens TTL, done fields...
FINALIZE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 5))
  redis.pcall('EXPIRE', KEYS[2], ARGV[4])
  redis.pcall('DEL', KEYS[3])
  return 1
end
redis.call('HINCRBY', KEYS[4], 'duplicate_finals', 1)
return 0
"""

# KEYS: result, tokens. ARGV: tokens MAXLEN, tokens TTL, event fields...
APPEND_UNLESS_FINAL = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.pcall('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


def flat_fields(fields: dict[str, Any]) -> list[Any]:
    """{k: v, ...} -> [k, v, ...], the argument form of XADD / HSET."""
    return [x for kv in fields.items() for x in kv]


def finalize_cmd(result_key: str, tokens_key: str, status_key: str, stats_key: str, result_json: bytes,
                 result_ttl: int, tokens_maxlen: int, tokens_ttl: int, done_fields: dict[str, Any]) -> tuple:
    """EVAL arguments of FINALIZE; its reply is 1 when this write won, 0 for a suppressed duplicate."""
    return ("EVAL", FINALIZE, 4, result_key, tokens_key, status_key, stats_key,
            result_json, result_ttl, tokens_maxlen, tokens_ttl, *flat_fields(done_fields))


def append_unless_final_cmd(result_key: str, tokens_key: str, tokens_maxlen: int, tokens_ttl: int,
                            fields: dict[str, Any]) -> tuple:
    """EVAL arguments of APPEND_UNLESS_FINAL (restart events)."""
    return ("EVAL", APPEND_UNLESS_FINAL, 2, result_key, tokens_key, tokens_maxlen, tokens_ttl, *flat_fields(fields))
