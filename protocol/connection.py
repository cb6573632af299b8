"""The one place where spool builds Redis clients: retries, timeouts and keepalive for producers and workers.

Every URL form redis-py knows works: redis://[[user]:password@]host:port/db (AUTH / ACL users),
rediss://... (TLS; ?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem and friends in the query string)
and unix:///path/redis.sock. Query-string options override the defaults set here.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from protocol.defaults import Defaults

# Redis is unreachable, restarting or loading its AOF: wait and send again on a fresh connection; nothing is
# wrong with the command. (BusyLoadingError is a ConnectionError; socket timeouts are OSErrors.)
TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# ...but these are ConnectionErrors too, and trying a wrong password again only delays the error.
NEVER_RETRY = (redis.AuthenticationError, redis.exceptions.AuthorizationError)
SCHEMES = ("redis", "rediss", "unix")
_SECRET_QUERY_KEYS = ("password", "pass", "pwd")


def _retryable(is_retryable):
    return lambda e: not isinstance(e, NEVER_RETRY) and (is_retryable is None or is_retryable(e))


class _Retry(Retry):
    """redis-py's Retry, except that authentication failures are raised at once."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        return super().call_with_retry(do, fail, _retryable(is_retryable), with_failure_count)


class _AsyncRetry(AsyncRetry):
    """The asyncio twin of _Retry."""

    async def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        return await super().call_with_retry(do, fail, _retryable(is_retryable), with_failure_count)


def client_kwargs(url: str, *, fail_fast: bool = False, defaults: Defaults | None = None) -> dict[str, Any]:
    """Keyword arguments for Redis.from_url(url, ...): spool's retry, timeout and keepalive policy."""
    d = defaults or Defaults.from_env()
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss:// or unix://")
    # A worker must keep its engine stepping while Redis is away, so its calls fail fast and its loop backs
    # off on its own; a producer call rides out a restart (redis_retries attempts, capped backoff) instead.
    retries = 1 if fail_fast else d.redis_retries
    cap = 0.25 if fail_fast else d.redis_retry_cap_ms / 1000
    kw: dict[str, Any] = {
        "retries": retries,
        "cap": cap,
        # Longer than the longest blocking read (XREAD/XREADGROUP BLOCK), so a slow Redis is not mistaken
        # for a dead one; short enough that a vanished host is noticed.
        "socket_timeout": d.block_ms / 1000 + 10.0,
        "socket_connect_timeout": (2.0 if fail_fast else d.redis_connect_timeout_ms / 1000),
        "health_check_interval": 30,  # PING a connection that sat idle this long before trusting it
    }
    if scheme != "unix":
        kw["socket_keepalive"] = True  # unix sockets have no TCP keepalive (redis-py rejects the option)
    return kw


def connect(url: str, *, fail_fast: bool = False, defaults: Defaults | None = None, **extra: Any) -> redis.Redis:
    """A redis.Redis for `url` with spool's retry policy; `extra` keyword arguments (socket_timeout=...,
    client_name=...) override it."""
    kw = client_kwargs(url, fail_fast=fail_fast, defaults=defaults)
    retry = _Retry(ExponentialBackoff(cap=kw.pop("cap"), base=0.05), kw.pop("retries"),
                   supported_errors=TRANSIENT_ERRORS)
    return redis.Redis.from_url(url, retry=retry, retry_on_error=list(TRANSIENT_ERRORS), **{**kw, **extra})


def connect_async(url: str, *, defaults: Defaults | None = None, **extra: Any) -> aioredis.Redis:
    """The asyncio twin of connect()."""
    kw = client_kwargs(url, defaults=defaults)
    retry = _AsyncRetry(ExponentialBackoff(cap=kw.pop("cap"), base=0.05), kw.pop("retries"),
                        supported_errors=TRANSIENT_ERRORS)
    return aioredis.Redis.from_url(url, retry=retry, retry_on_error=list(TRANSIENT_ERRORS), **{**kw, **extra})


def redact_url(url: str | None) -> str:
    """`url` with its password (in the authority or the query string) replaced by ***."""
    if not url:
        return str(url)
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        netloc = f"{user}:***@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*/")
    return urlunsplit(parts._replace(netloc=netloc, query=query))
