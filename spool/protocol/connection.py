"""The one place where spool builds Redis clients: retries, timeouts and keepalive for producers and workers.

Every URL form redis-py knows works: redis://[[user]:password@]host:port/db (AUTH / ACL users),
rediss://... (TLS; ?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem and friends in the query string)
and unix:///path/redis.sock. Query-string options override the defaults set here.

A redis:// or rediss:// URL may name any node of a Redis Cluster: a node that reports cluster_enabled:1 in
INFO cluster gets redis-py's cluster client (RedisCluster), which finds the other nodes itself. Sentinel:
redis+sentinel://[[user]:password@]host:port[,host:port...]/master_name[/db] (rediss+sentinel:// for TLS to
the data nodes), or SPOOL_REDIS_SENTINELS=host:port,... with SPOOL_REDIS_MASTER=name; the client asks the
sentinels for the master and asks again after a failover (a demoted master's READONLY error is a
ConnectionError, so the retry paths below reconnect to the new one).
"""
from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from spool.protocol.defaults import Defaults
from spool.protocol.env import env_text

# Redis is unreachable, restarting or loading its AOF: wait and send again on a fresh connection; nothing is
# wrong with the command. (BusyLoadingError is a ConnectionError; socket timeouts are OSErrors.)
# A cluster that is failing over a node (CLUSTERDOWN, TRYAGAIN, a slot no node serves for a moment) is
# the same kind of wait. After a Sentinel failover the old master answers writes with READONLY; redis-py's
# sentinel connection turns that into a ConnectionError, so it is covered too.
TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, redis.exceptions.ClusterDownError,
                    redis.exceptions.TryAgainError, redis.exceptions.SlotNotCoveredError)
# ...but these are ConnectionErrors too, and trying a wrong password again only delays the error.
NEVER_RETRY = (redis.AuthenticationError, redis.exceptions.AuthorizationError)
log = logging.getLogger(__name__)
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)
ENV_REDIS_SENTINELS = "SPOOL_REDIS_SENTINELS"  # host:port,host:port of the sentinels (with SPOOL_REDIS_MASTER)
ENV_REDIS_MASTER = "SPOOL_REDIS_MASTER"  # the master name the sentinels monitor
_SECRET_QUERY_KEYS = ("password", "pass", "pwd", "sentinel_password")


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
        raise ValueError(f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss://, unix:// "
                         "or redis+sentinel://")
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)  # a malformed sentinel URL is refused here, with the other URL errors
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


def sentinel_url_from_env(env: dict[str, str] | None = None) -> str | None:
    """redis+sentinel://... built from SPOOL_REDIS_SENTINELS and SPOOL_REDIS_MASTER, or None if unset."""
    hosts, master = env_text(ENV_REDIS_SENTINELS, env=env), env_text(ENV_REDIS_MASTER, env=env)
    if not hosts:
        return None
    if not master:
        raise ValueError(f"{ENV_REDIS_SENTINELS} is set: set {ENV_REDIS_MASTER} to the master name too")
    return f"redis+sentinel://{hosts.strip()}/{master.strip()}"


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """redis+sentinel://[[user]:password@]h:p[,h:p]/master[/db][?opts] -> (sentinels, master name,
    connection keyword arguments for the data nodes: db, username, password, ssl, query options)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    kw: dict[str, Any] = {}
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        user, _, password = auth.partition(":")
        if user:
            kw["username"] = unquote(user)
        if password:
            kw["password"] = unquote(password)
    sentinels = []
    for hostport in netloc.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if not host:
            host, port = port, "26379"
        try:
            sentinels.append((host.strip("[]"), int(port)))
        except ValueError:
            raise ValueError(f"bad sentinel address {hostport!r} in {redact_url(url)}") from None
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2:
        raise ValueError(f"bad sentinel URL {redact_url(url)}: use redis+sentinel://host:port[,host:port]/master[/db]")
    if len(path) == 2:
        kw["db"] = int(path[1])
    if parts.scheme.startswith("rediss"):
        kw["ssl"] = True
    for key, value in parse_qsl(parts.query):
        secret = "password" in key or "username" in key  # "1234" is a password here, not a number
        kw[key] = int(value) if value.isdigit() and not secret else value
    return sentinels, unquote(path[0]), kw


def is_cluster_url(url: str, defaults: Defaults | None = None) -> bool:
    """True if the node `url` names reports cluster_enabled:1 (INFO cluster); False for sentinel and unix URLs."""
    if urlsplit(url).scheme not in ("redis", "rediss"):
        return False
    kw = client_kwargs(url, fail_fast=True, defaults=defaults)
    probe = redis.Redis.from_url(url, socket_timeout=kw["socket_connect_timeout"] + 5,
                                 socket_connect_timeout=kw["socket_connect_timeout"])
    try:
        return bool(int(probe.info("cluster").get("cluster_enabled", 0)))
    except redis.ResponseError:  # INFO refused by an ACL, or a Redis-compatible server without sections
        return False
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        # Not up yet: callers retry a single node as before; a cluster node must answer when the client is made.
        log.info("could not ask %s whether it is a cluster node (%s); using a single-node client",
                    redact_url(url), e)
        return False
    finally:
        probe.close()


def is_cluster(client: Any) -> bool:
    """True for redis-py's cluster clients (sync or asyncio)."""
    return isinstance(client, (redis.RedisCluster, aiocluster.RedisCluster))


def connect(url: str, *, fail_fast: bool = False, defaults: Defaults | None = None, **extra: Any) -> redis.Redis:
    """A client for `url` with spool's retry policy: redis.Redis, redis.RedisCluster for a cluster node, or a
    Sentinel-managed master client for redis+sentinel://; `extra` keyword arguments (socket_timeout=...,
    client_name=...) override the policy."""
    kw = client_kwargs(url, fail_fast=fail_fast, defaults=defaults)
    retry = _Retry(ExponentialBackoff(cap=kw.pop("cap"), base=0.05), kw.pop("retries"),
                   supported_errors=TRANSIENT_ERRORS)
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        sentinels, master, node_kw = parse_sentinel_url(url)
        return redis.sentinel.Sentinel(sentinels, sentinel_kwargs=_sentinel_kwargs(kw, node_kw)).master_for(
            master, retry=retry, retry_on_error=list(TRANSIENT_ERRORS), **{**kw, **node_kw, **extra})
    if is_cluster_url(url, defaults):
        kw.pop("health_check_interval")  # not a cluster-client option
        return redis.RedisCluster.from_url(url, retry=retry, require_full_coverage=False, **{**kw, **extra})
    return redis.Redis.from_url(url, retry=retry, retry_on_error=list(TRANSIENT_ERRORS), **{**kw, **extra})


def connect_async(url: str, *, defaults: Defaults | None = None, **extra: Any) -> aioredis.Redis:
    """The asyncio twin of connect()."""
    kw = client_kwargs(url, defaults=defaults)
    retry = _AsyncRetry(ExponentialBackoff(cap=kw.pop("cap"), base=0.05), kw.pop("retries"),
                        supported_errors=TRANSIENT_ERRORS)
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        sentinels, master, node_kw = parse_sentinel_url(url)
        return aiosentinel.Sentinel(sentinels, sentinel_kwargs=_sentinel_kwargs(kw, node_kw)).master_for(
            master, retry=retry, retry_on_error=list(TRANSIENT_ERRORS), **{**kw, **node_kw, **extra})
    if is_cluster_url(url, defaults):  # a one-off blocking probe at construction time, as for the embedded server
        kw.pop("health_check_interval")
        return aiocluster.RedisCluster.from_url(url, retry=retry, require_full_coverage=False, **{**kw, **extra})
    return aioredis.Redis.from_url(url, retry=retry, retry_on_error=list(TRANSIENT_ERRORS), **{**kw, **extra})


def refresh_master(client: Any) -> bool:
    """Ask the sentinels for the master of a Sentinel-managed client; True if it moved (idle pooled connections
    to the old one are then closed). After SENTINEL FAILOVER the old master keeps accepting writes until the
    sentinels reconfigure it (up to ~10 s); a pooled connection to it would go on writing there meanwhile.
    False, and nothing asked, for other clients."""
    pool = getattr(client, "connection_pool", None)
    proxy = getattr(pool, "proxy", None)
    if proxy is None or not getattr(proxy, "is_master", False):
        return False
    before = proxy.master_address
    return pool.get_master_address() != before and before is not None


async def refresh_master_async(client: Any) -> bool:
    """The asyncio twin of refresh_master()."""
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, aiosentinel.SentinelConnectionPool) or not pool.is_master:
        return False
    before = pool.master_address
    return await pool.get_master_address() != before and before is not None


def _sentinel_kwargs(kw: dict[str, Any], node_kw: dict[str, Any]) -> dict[str, Any]:
    """Options for the connections to the sentinels themselves: short timeouts (a dead sentinel is skipped),
    and ?sentinel_password=... (and sentinel_username) from the URL, taken out of the data nodes' options."""
    out = {"socket_timeout": min(kw["socket_timeout"], 5.0), "socket_connect_timeout": kw["socket_connect_timeout"]}
    for name in ("username", "password"):
        value = node_kw.pop(f"sentinel_{name}", None)
        if value is not None:
            out[name] = str(value)
    return out


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


def script_route(client: Any, args: tuple[Any, ...], options: dict[str, Any] | None) -> dict[str, Any]:
    """Options for one pipelined command, naming the node of a script call's first key.

    redis-py 8's sync cluster pipeline finds the keys of a command with movable keys (EVAL, EVALSHA) by asking
    the server (COMMAND GETKEYS): one extra synchronous round trip per script call, the streamed-token path's
    dominant command (its asyncio pipeline reads them from the arguments: measured, no extra call). Our
    scripts keep all their keys in one slot, so the first key names the node; on a MOVED reply redis-py drops
    the hint and routes the retry itself.
    """
    options = dict(options or {})
    if (len(args) > 3 and str(args[0]).upper() in ("EVAL", "EVALSHA") and int(args[2]) > 0
            and "target_nodes" not in options):
        options["target_nodes"] = client.get_node_from_key(args[3])
    return options
