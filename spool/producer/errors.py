"""Producer-side errors beyond JobError: Redis refusing writes because it is full."""
from __future__ import annotations

import redis


class RedisFullError(redis.exceptions.OutOfMemoryError):
    """Redis refused a write: it reached maxmemory under the noeviction policy (the one a queue needs).

    Nothing of the refused command was written, and enqueues are idempotent by id: once memory is freed
    (results collected or expired, a larger maxmemory), sending the same jobs again is safe. A subclass of
    redis-py's OutOfMemoryError, so code that already catches that (or ResponseError) keeps working.
    `enqueued`: from enqueue_many, the ids of the chunks Redis took before it refused one.
    """

    enqueued: list[str] = []

    @classmethod
    def from_error(cls, error: redis.exceptions.OutOfMemoryError) -> RedisFullError:
        """The one-line message a person reads, with Redis's own words at the end."""
        return cls("Redis is out of memory (maxmemory reached, policy noeviction) and refused the write; nothing "
                   "was enqueued by it: free memory (collect or expire results, raise maxmemory) and send it again "
                   f"[{str(error).splitlines()[0] if str(error) else 'OOM'}]")


def refused_for_memory(steps, error: redis.exceptions.OutOfMemoryError) -> RedisFullError:
    """A verb's write hit maxmemory: tell the verb's generator (it adds what it knows, e.g. enqueue_many's ids
    sent, and re-raises), then hand back the error for the caller to raise."""
    full = RedisFullError.from_error(error)
    full.__cause__ = error
    steps.throw(full)
    return full

