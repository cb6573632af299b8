"""The worker's Redis Cluster paths: the outbox's writes in two ordered phases, and fair reads of the shards.

On one Redis the outbox sends a step's writes in one MULTI/EXEC. A cluster cannot run a transaction across
hash slots, so there the writes go as a pipeline (redis-py groups it by node) in two phases: everything but
the XACKs and XDELs of jobs entries first, then those, only once the first phase fully succeeded. A worker
that dies between the phases leaves entries pending whose results exist; the next run of such an entry is
a duplicate that changes nothing (ADMIT sees the result; FINALIZE's first final wins). Every command is safe
to send twice (spool.protocol.scripts), so a phase that fails is kept whole and sent again.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from redis.crc import key_slot

from spool.protocol.connection import is_cluster, script_route
from spool.protocol.keys import Keys
from spool.protocol.priorities import PRIORITIES
from spool.protocol.scripts import Script

log = logging.getLogger(__name__)

AFTER_RESULTS = ("XACK", "XDEL")  # sent only once the results (and everything else) of the step have landed
# Replies that mean a write was not applied for a reason that is not the command's own (a node away, out of
# memory, a demoted master, an ACL, a script a node forgot twice): the phase is kept whole and sent again
# later, like a single Redis's EXECABORT, so no XACK ever follows a result that did not land. Other errors
# (WRONGTYPE on a key someone else wrote) cost only their command, as on a single Redis.
KEEP_ALL = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError,
            redis.exceptions.TryAgainError, redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
            redis.exceptions.NoPermissionError, redis.exceptions.NoScriptError)


def send_phased(client: redis.RedisCluster, commands: Sequence[tuple[tuple[Any, ...], dict[str, Any] | None]],
                scripts: Sequence[Script]) -> list[Any]:
    """Run (execute_command args, options) pairs on a cluster in two phases; returns replies in input order.

    Raises the pipeline's error if a phase could not be sent (nothing of a later phase is sent then);
    per-command errors come back as values, as with raise_on_error=False.
    """
    replies: list[Any] = [None] * len(commands)
    first = [i for i, (args, _) in enumerate(commands) if str(args[0]).upper() not in AFTER_RESULTS]
    second = [i for i, (args, _) in enumerate(commands) if str(args[0]).upper() in AFTER_RESULTS]
    for phase in (first, second):
        if not phase:
            continue
        got = _pipeline(client, [commands[i] for i in phase])
        missing = [n for n, reply in enumerate(got) if isinstance(reply, redis.exceptions.NoScriptError)]
        if missing:  # a node restarted (or a failover promoted a replica) and forgot the scripts: load, resend
            for script in scripts:
                client.script_load(script.text)  # the cluster client sends SCRIPT LOAD to every primary
            again = _pipeline(client, [commands[phase[n]] for n in missing])
            for n, reply in zip(missing, again):
                got[n] = reply
        failed = next((r for r in got if isinstance(r, KEEP_ALL)), None)
        if failed is not None:
            raise failed  # the outbox keeps everything; the next flush sends it again
        for i, reply in zip(phase, got):
            replies[i] = reply
    return replies


def _pipeline(client: redis.RedisCluster, commands: Sequence[tuple[tuple[Any, ...], dict[str, Any] | None]]):
    pipe = client.pipeline(transaction=False)
    for args, options in commands:
        pipe.execute_command(*args, **script_route(client, args, options))
    try:
        return pipe.execute(raise_on_error=False)
    finally:
        pipe.reset()


class ShardReader:
    """XREADGROUP over the jobs streams: one call per hash slot (on a cluster XREADGROUP of several streams
    must stay in one slot), starting at a different slot each time (fair)."""

    def __init__(self, client: Any):
        self.client = client
        self.cluster = is_cluster(client)
        self._turn = 0

    def fair(self, streams: Sequence[str]) -> list[str]:
        """`streams` rotated by one more place each call, so no shard is always read first."""
        if len(streams) <= 1:
            return list(streams)
        self._turn += 1
        k = self._turn % len(streams)
        return [*streams[k:], *streams[:k]]

    def by_priority(self, keys: Keys) -> list[str]:
        """Every jobs stream, interactive shards first, each priority's shards in a new order each call."""
        return [s for p in PRIORITIES for s in self.fair(keys.jobs_of(p))]

    def read(self, group: str, consumer: str, streams: dict[str, str], count: int,
             block: int | None = None) -> list:
        """Entries of `streams` ([stream, [(id, fields)...]] as redis-py returns them); blocks up to `block` ms
        when nothing is there. One call for the unsharded streams of a single Redis (at most `count` per
        stream, as before shards existed); with shards, or on a cluster, one call per hash slot and at most
        `count` in all, so a worker never takes `count` jobs from every shard at once."""
        if len(streams) <= 1 or (not self.cluster and len(streams) <= 2):
            return self.client.xreadgroup(group, consumer, streams, count=count, block=block) or []
        slots: dict[int, dict[str, str]] = {}
        for stream, start in streams.items():
            slots.setdefault(key_slot(stream.encode()), {})[stream] = start
        groups = self.fair(list(slots.values()))  # type: ignore[arg-type]
        out: list = []
        left = count
        for part in groups:
            if left <= 0:
                break
            got = self.client.xreadgroup(group, consumer, part, count=left) or []
            out.extend(got)
            left -= sum(len(msgs) for _, msgs in got)
        if not out and block:
            # Nothing anywhere: wait on one slot group (the next one each time) for a share of the block time.
            wait = max(1, block // len(groups))
            out = self.client.xreadgroup(group, consumer, groups[0], count=count, block=wait) or []
        return out
