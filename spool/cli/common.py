"""What every verb that talks to a deployment shares: exit codes, one-line errors, the --redis-url/--prefix flags,
a client that says which Redis it cannot reach (and gives up in bounded time), the live-worker check, output."""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import orjson

from spool.protocol.defaults import DEFAULT_PREFIX
from spool.protocol.env import ENV_PREFIX_KEY, ENV_REDIS_URL, env_text

# Exit codes of every verb (docs/OPERATIONS.md). argparse itself exits 2 on a usage error.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_REDIS = 0, 1, 2, 3, 4
EXIT_QUEUED, EXIT_RUNNING = 5, 6  # `spool result ID` without --wait: not final yet
ENV_REDIS_WAIT = "SPOOL_REDIS_WAIT_S"
DEFAULT_REDIS_WAIT_S = 15.0  # rides out a Redis restart; longer than that, a person wants to hear about it
DEFAULT_WAIT_S = 600.0  # --timeout of enqueue --wait/--stream, tail and result --wait


class CliError(Exception):
    """An expected failure: one line on stderr and a documented exit code (the traceback only with -v)."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.message, self.code = message, code


def say(message: str) -> None:
    """A note for the person at the terminal, on stderr (stdout stays the command's output)."""
    print(f"spool: {message}", file=sys.stderr, flush=True)


def seconds(text: str) -> float:
    """argparse type for a duration: a positive number of seconds, or `inf`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number, or inf), got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def request_id(text: str) -> str:
    """argparse type for a request id: the protocol's id rule, checked before anything talks to Redis."""
    from spool.protocol.keys import validate_id

    try:
        return validate_id(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def finite(timeout: float | None) -> float | None:
    """The Client's form of a --timeout: None for inf (wait forever)."""
    return None if timeout is None or math.isinf(timeout) else timeout


def add_redis_flags(parser: argparse.ArgumentParser) -> None:
    """--redis-url, --prefix and --redis-wait, defaulting to SPOOL_REDIS_URL, SPOOL_PREFIX, SPOOL_REDIS_WAIT_S."""
    group = parser.add_argument_group("deployment")
    group.add_argument("--redis-url", default=env_text(ENV_REDIS_URL), metavar="URL",
                       help=f"redis://, rediss://, unix:// or redis+sentinel://h:p[,h:p]/master URL of the "
                            f"deployment (a Redis Cluster node is detected) [{ENV_REDIS_URL}; default: the "
                            "embedded local server, started on first use]")
    group.add_argument("--prefix", default=env_text(ENV_PREFIX_KEY, DEFAULT_PREFIX),
                       help=f"key prefix of the deployment [{ENV_PREFIX_KEY}; default: {DEFAULT_PREFIX}]")
    group.add_argument("--job-shards", type=int, default=None, metavar="N",
                       help="jobs streams per priority, as the workers' --job-shards "
                            "[SPOOL_JOB_SHARDS; default: 1]")
    group.add_argument("--redis-wait", type=seconds, metavar="SECONDS",
                       default=env_text(ENV_REDIS_WAIT, f"{DEFAULT_REDIS_WAIT_S:g}"),  # a string: argparse checks it
                       help=f"keep retrying an unreachable Redis this long, then exit 4 [{ENV_REDIS_WAIT}; "
                            f"default: {DEFAULT_REDIS_WAIT_S:.0f}]")


def describe_redis(args: argparse.Namespace) -> str:
    """The deployment's Redis for a message: its URL without password, and whether it is the embedded one."""
    from spool.protocol.connection import redact_url

    url = getattr(args, "resolved_url", None) or args.redis_url or "?"
    if not args.redis_url:
        return f"the embedded Redis at {url} (no --redis-url or {ENV_REDIS_URL} given)"
    return redact_url(url)


def client(args: argparse.Namespace):
    """A producer Client for the deployment the flags name, once its Redis answers (else CliError, exit 4)."""
    from spool.producer.client import Client
    from spool.producer.ops import resolve_url

    try:
        url = resolve_url(args.redis_url)
    except (OSError, RuntimeError, ValueError) as e:  # no redis-server binary, or it would not start
        raise CliError(f"could not start the embedded Redis: {e}", EXIT_REDIS) from e
    args.resolved_url = url
    try:
        from spool.protocol.connection import client_kwargs

        client_kwargs(url)  # a malformed URL or an unknown scheme: a usage error before any waiting
    except ValueError as e:
        raise CliError(f"bad Redis URL {url!r}: {e}", EXIT_USAGE) from e
    # Wait first: the client asks the server whether it is a cluster node when it is made.
    wait_for_redis(args, url, getattr(args, "redis_wait", DEFAULT_REDIS_WAIT_S))
    try:
        return Client(url, prefix=args.prefix, job_shards=getattr(args, "job_shards", None),
                      durable=getattr(args, "durable", False))
    except ValueError as e:  # a malformed URL, durable on a cluster
        raise CliError(f"bad Redis URL {url!r}: {e}", EXIT_USAGE) from e


def _unreachable_reason(error: Exception, url: str) -> str:
    """One line on why Redis did not answer (redis-py's MasterNotFoundError embeds whole client reprs)."""
    from redis.sentinel import MasterNotFoundError

    if isinstance(error, MasterNotFoundError):
        from spool.protocol.connection import parse_sentinel_url

        return f"no reachable sentinel names a master {parse_sentinel_url(url)[1]!r}"
    return str(error)


def wait_for_redis(args: argparse.Namespace, url: str, budget_s: float) -> None:
    """PING with short timeouts until Redis answers; say once that we retry, give up after budget_s (exit 4)."""
    import redis

    from spool.protocol.connection import client_kwargs

    kw = client_kwargs(url, fail_fast=True)
    kw.pop("retries"), kw.pop("cap")
    kw.update(socket_timeout=2.0, socket_connect_timeout=2.0, retry=None)
    if url.split("://", 1)[0].endswith("+sentinel"):
        from spool.protocol.connection import connect

        probe = connect(url, fail_fast=True, socket_timeout=2.0, socket_connect_timeout=2.0)  # asks the sentinels
    else:
        probe = redis.Redis.from_url(url, **kw)
    give_up, pause, told = time.monotonic() + budget_s, 0.1, False
    try:
        while True:
            try:
                probe.ping()
                return
            except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as e:
                raise CliError(f"Redis at {describe_redis(args)} refused our credentials: {e}", EXIT_REDIS) from e
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                why = _unreachable_reason(e, url)
                if time.monotonic() + pause > give_up:
                    raise CliError(f"cannot reach Redis at {describe_redis(args)} after {budget_s:g}s: {why}",
                                   EXIT_REDIS) from e
                if not told:
                    say(f"cannot reach Redis at {describe_redis(args)} ({why}); retrying for up to {budget_s:g}s")
                    told = True
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
    finally:
        probe.close()


def note_if_no_worker(producer, args: argparse.Namespace, what: str) -> None:
    """If no live worker is registered on this Redis, say so at once (else a wait looks like a hang)."""
    from spool.producer.admin import live_workers

    if not live_workers(producer.redis, producer.keys):
        timeout = getattr(args, "timeout", None)
        limit = "for ever" if timeout is None or math.isinf(timeout) else f"up to {timeout:g}s (--timeout)"
        start = "spool worker --model DIR" + ("" if not args.redis_url else " --redis-url URL")
        say(f"no live worker on {describe_redis(args)}: {what} waits in the queue until one starts "
            f"({start}); waiting {limit}")


def print_json(obj: Any) -> None:
    """Print `obj` as indented JSON on stdout."""
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
