"""The Lua scripts that make every write of the protocol safe to repeat, and their argument builders.

Writes get repeated: a transaction whose reply was lost is sent again, a producer resends after a timeout,
two workers run one job (a reclaim from a worker that only stalled). Each script decides inside Redis, in
one atomic step, whether its write is new:

- ENQUEUE: a job id is claimed by the digest (SHA-1) of its document. The same document again adds
  nothing (a resend is idempotent); another document under a live or finished id is `duplicate_id`. The
  claim and the XADD touch different hash slots (a request's keys and a jobs stream), so they are two
  steps: the claim leaves the status `enqueuing` until MARK_QUEUED, sent after the XADD succeeded, turns it
  into `queued`; a resend that finds `enqueuing` (the producer died or lost the connection in between)
  XADDs again. At worst two entries carry the same document; the worker runs it once and acks the other.
- ADMIT: the worker's check before it runs an entry: the same digest rule for raw XADD producers (the first
  run claims the id), plus whether the job is final or cancelled, and its quarantine record.
- APPEND: one write of a run's token events (a request's coalesced deltas: one entry per choice), each
  carrying its run and its position (seq) in that run. Events at or below the stream's last position of the
  same run were applied already; events of another run than the one that owns the stream are dropped
  (only a `restart`, which takes the stream over, may change owner); nothing is appended once a final
  result exists, so nothing ever follows `done`. The stream's TTL is set when the worker asks (a few times
  a minute, not per write) and whenever a write creates the stream.
- FINALIZE: the first final result wins (SET NX); only the winner appends `done`, clears the status and
  the quarantine record and keeps the id's digest as long as the result. If the token stream does not end
  with the winner's own last event (another run owned it, or deltas were shed while Redis was away), the
  winner appends a `restart` and its whole output as one delta per choice first, so a stream read after
  its last restart always equals the result. A losing write changes nothing (the worker counts it in the
  stats hash, `duplicate_finals`, with a command of its own: the hash lives in another slot).

Every script touches the keys of one request only (one hash slot, spool.protocol.keys), so each runs unchanged on
Redis Cluster. The result and the XACK of its jobs entry are separate slots there: the worker sends the XACK
only after the result landed, and a worker that dies in between leaves an entry whose rerun is a duplicate
that changes nothing (first final wins; ADMIT sees the result and the entry is only acked).

Producers send scripts as EVAL with their text. The worker's outbox sends EVALSHA and loads the scripts it
uses at the head of the same MULTI/EXEC, so a Redis that restarted (and forgot its scripts) never fails a
queued write with NOSCRIPT.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script, its SHA-1 for EVALSHA, and how many keys it takes."""

    name: str
    num_keys: int
    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())

    def args(self, keys: list[str], argv: list[Any]) -> tuple[Any, ...]:
        """EVALSHA arguments (execute_command form) for these keys and arguments."""
        if len(keys) != self.num_keys:
            raise ValueError(f"{self.name} takes {self.num_keys} keys, got {len(keys)}")
        return ("EVALSHA", self.sha, self.num_keys, *keys, *argv)

    def eval_cmd(self, keys: list[str], argv: list[Any]) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        """The same call as a spool.protocol.commands.Cmd (EVAL with the text: nothing to load first)."""
        if len(keys) != self.num_keys:
            raise ValueError(f"{self.name} takes {self.num_keys} keys, got {len(keys)}")
        # execute_command("EVAL", ...) rather than .eval(): redis-py's cluster pipeline has no eval method, and
        # routes EVAL by its keys either way.
        return ("execute_command", ("EVAL", self.text, self.num_keys, *keys, *argv), {})


def digest(raw: bytes | str) -> str:
    """The digest that claims a job id: SHA-1 hex of the job document's bytes (redis.sha1hex in Lua)."""
    return hashlib.sha1(raw.encode() if isinstance(raw, str) else raw).hexdigest()


# Reads the run and seq fields of a token stream's last entry: (nil, -1) for an empty stream.
_LAST_EVENT = """
local function last_event(key)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if not last then return nil, -1 end
  local run, seq, f = nil, -1, last[2]
  for i = 1, #f, 2 do
    if f[i] == 'run' then run = f[i + 1] elseif f[i] == 'seq' then seq = tonumber(f[i + 1]) end
  end
  return run, seq
end
"""

# KEYS: digest, status, result (one request's slot). ARGV: job document, status TTL, digest TTL.
# Returns 1 (claimed: XADD the document now), 0 (this document is already enqueued or done: nothing to add),
# -1 (duplicate_id).
ENQUEUE = Script("enqueue", 3, """
local digest = redis.sha1hex(ARGV[1])
local held = redis.call('GET', KEYS[1])
if held then
  if held ~= digest then return -1 end
  if redis.call('GET', KEYS[2]) == 'enqueuing' then return 1 end
  return 0
end
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
redis.call('SET', KEYS[1], digest, 'EX', ARGV[3])
redis.call('SET', KEYS[2], 'enqueuing', 'EX', ARGV[2])
return 1
""")

# KEYS: status. After the XADD of a claimed job: 'enqueuing' becomes 'queued' (a worker's 'running', or a
# status already deleted by the final result, is left alone). Returns 1 if it changed the status.
MARK_QUEUED = Script("mark_queued", 1, """
if redis.call('GET', KEYS[1]) ~= 'enqueuing' then return 0 end
redis.call('SET', KEYS[1], 'queued', 'KEEPTTL')
return 1
""")

# KEYS: digest, result, cancel, quarantine. ARGV: the entry's digest, digest TTL.
# Returns {same document (1/0), has result (1/0), cancelled (1/0), and the quarantine record: runner or
# false, deaths, the worker of the last death or false}.
ADMIT = Script("admit", 4, """
local held = redis.call('GET', KEYS[1])
local has_result = redis.call('EXISTS', KEYS[2])
local same = 1
if held then
  if held ~= ARGV[1] then same = 0 end
elseif has_result == 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
local q = redis.call('HMGET', KEYS[4], 'runner', 'deaths', 'died_on')
return {same, has_result, redis.call('EXISTS', KEYS[3]), q[1], tonumber(q[2]) or 0, q[3]}
""")

# KEYS: result, tokens. ARGV: run, seq of the first event, tokens MAXLEN, tokens TTL, takeover (1 for a
# restart), refresh (1: set the TTL now), then each event as its type and data JSON.
# Returns 1 when appended, 0 when the events were applied already, belong to a run that lost the stream, or
# the request is final. The TTL is set by a write that asks for it (the worker does, on a run's first write
# and then every few seconds, never per write) and by every write that creates the stream, so the key
# expires even if its worker dies mid-stream or the stream expired and is written again.
APPEND = Script("append", 2, _LAST_EVENT + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local run, seq = last_event(KEYS[2])
if run == ARGV[1] then
  if seq >= tonumber(ARGV[2]) then return 0 end
elseif run ~= nil and ARGV[5] ~= '1' then
  return 0
end
local fresh = run == nil  -- no entry of any run: the stream is new (or holds no run's entry): set its TTL
seq = tonumber(ARGV[2])
for i = 7, #ARGV, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'run', ARGV[1], 'seq', seq, 'type', ARGV[i],
             'data', ARGV[i + 1])
  seq = seq + 1
end
if ARGV[6] == '1' or fresh then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
return 1
""")

# KEYS: result, tokens, status, digest, quarantine (one request's slot).
# ARGV: result JSON, result TTL, tokens MAXLEN, stream TTL after done, run, last seq of the run (-1: the
# run streamed nothing), stream mode (0: not streamed, 1: streamed, 2: streamed with gaps: replay), done fields...
# Returns 1 when this final result won, 0 for a suppressed duplicate.
FINALIZE = Script("finalize", 5, _LAST_EVENT + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return 0
end
local seq = tonumber(ARGV[6])
if ARGV[7] ~= '0' then
  local run, last = last_event(KEYS[2])
  if ARGV[7] == '2' or (not (run == nil and seq == -1) and (run ~= ARGV[5] or last ~= seq)) then
    seq = seq + 1
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'run', ARGV[5], 'seq', seq, 'type', 'restart',
               'data', cjson.encode({reason = 'the stream did not hold this run\\'s output: replayed whole'}))
    for _, c in ipairs(cjson.decode(ARGV[1]).choices) do
      if #c.token_ids > 0 then
        seq = seq + 1
        local data = {index = c.index, text = c.text, token_ids = c.token_ids, finish_reason = c.finish_reason}
        if c.logprobs ~= cjson.null then data.logprobs = c.logprobs end
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'run', ARGV[5], 'seq', seq, 'type', 'delta',
                   'data', cjson.encode(data))
      end
    end
  end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'run', ARGV[5], 'seq', seq + 1, unpack(ARGV, 8))
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[3], KEYS[5])
redis.call('EXPIRE', KEYS[4], ARGV[2])
return 1
""")

SCRIPTS = (ENQUEUE, MARK_QUEUED, ADMIT, APPEND, FINALIZE)


def flat_fields(fields: dict[str, Any]) -> list[Any]:
    """{k: v, ...} -> [k, v, ...], the argument form of XADD / HSET."""
    return [x for kv in fields.items() for x in kv]
