"""A real Redis master + replica + Sentinel set on free loopback ports in a tmp dir: for tests and benchmarks.

    with SentinelSet(tmp_path / "sentinel") as s:
        url = s.url                # redis+sentinel://127.0.0.1:PORT/spool
        s.failover()               # SENTINEL FAILOVER; returns once the sentinels name the replica as master

Sentinels run as `redis-server sentinel.conf --sentinel` (Debian ships no separate redis-sentinel binary).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import redis

from spool.testing.redis_server import RedisServer, free_port

MASTER_NAME = "spool"


class ReplicaServer(RedisServer):
    """A redis-server that replicates `master_port` from its first start."""

    def __init__(self, directory: str | os.PathLike[str], master_port: int, **kwargs: object):
        super().__init__(directory, **kwargs)  # type: ignore[arg-type]
        self.master_port = master_port

    def _write_config(self) -> Path:
        conf = super()._write_config()
        with conf.open("a") as f:
            f.write(f"replicaof 127.0.0.1 {self.master_port}\n")
        return conf


class SentinelServer(RedisServer):
    """A redis-server in sentinel mode watching one master."""

    def __init__(self, directory: str | os.PathLike[str], master_port: int, quorum: int,
                 down_after_ms: int = 1000, **kwargs: object):
        super().__init__(directory, **kwargs)  # type: ignore[arg-type]
        self.master_port, self.quorum, self.down_after_ms = master_port, quorum, down_after_ms
        self._written = False

    def _write_config(self) -> Path:
        conf = self.dir / "sentinel.conf"
        if self._written:  # a sentinel rewrites its own config (known replicas, epochs): keep it on restart
            return conf
        conf.write_text("\n".join([
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self.dir}"',
            'logfile "redis.log"',
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} 10000",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
            "",
        ]))
        self._written = True
        return conf

    def start(self, timeout: float = 10.0) -> SentinelServer:
        """Start in sentinel mode (the config path is followed by --sentinel)."""
        import subprocess

        self.proc = subprocess.Popen([self.binary, str(self._write_config()), "--sentinel"], cwd=self.dir,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not self._wait_up(timeout):
            self.kill()
            raise RuntimeError(f"sentinel did not start on port {self.port}; log:\n{self.log_tail()}")
        return self


class SentinelSet:
    """One master, `replicas` replicas and `sentinels` sentinels (quorum: a majority of them)."""

    def __init__(self, directory: str | os.PathLike[str], *, replicas: int = 1, sentinels: int = 1,
                 appendonly: bool = False, down_after_ms: int = 1000):
        self.dir = Path(directory)
        self.master = RedisServer(self.dir / "master", appendonly=appendonly)
        self.replicas = [ReplicaServer(self.dir / f"replica{i}", self.master.port, appendonly=appendonly)
                         for i in range(replicas)]
        quorum = sentinels // 2 + 1
        self.sentinels = [SentinelServer(self.dir / f"sentinel{i}", self.master.port, quorum, down_after_ms,
                                         port=free_port()) for i in range(sentinels)]

    @property
    def servers(self) -> list[RedisServer]:
        """The data nodes (the first started as master; after a failover another one is)."""
        return [self.master, *self.replicas]

    @property
    def url(self) -> str:
        """redis+sentinel://host:port[,host:port]/MASTER_NAME, as spool's connection module reads it."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def start(self, timeout: float = 30.0) -> SentinelSet:
        """Start master, replicas and sentinels; return once replicas are in sync and sentinels see them."""
        try:
            self.master.start()
            for replica in self.replicas:
                replica.start()
            for sentinel in self.sentinels:
                sentinel.start()
            self._wait(lambda: self._replicas_synced(self.master_server()) and self._sentinels_ready(), timeout,
                       "replicas in sync and known to every sentinel")
        except BaseException:
            self.stop()
            raise
        return self

    def master_port(self) -> int:
        """The port the first sentinel names as master now."""
        r = self.sentinels[0].client(socket_timeout=2)
        try:
            host, port = r.sentinel_get_master_addr_by_name(MASTER_NAME)
            return int(port)
        finally:
            r.close()

    def master_server(self) -> RedisServer:
        """The data node the sentinels name as master."""
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def failover(self, timeout: float = 30.0) -> RedisServer:
        """SENTINEL FAILOVER, then wait until another node is master and answers writes; returns it."""
        before = self.master_port()
        r = self.sentinels[0].client(socket_timeout=2)
        try:
            r.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        finally:
            r.close()
        self._wait(lambda: self.master_port() != before and self._is_writable_master(self.master_server()),
                   timeout, "a new master after SENTINEL FAILOVER")
        return self.master_server()

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Block until every replica of the current master is online and caught up."""
        self._wait(lambda: self._replicas_synced(self.master_server()), timeout, "replicas in sync")

    def _is_writable_master(self, server: RedisServer) -> bool:
        r = server.client(socket_timeout=1)
        try:
            return r.info("replication").get("role") == "master"
        except redis.RedisError:
            return False
        finally:
            r.close()

    def _replicas_synced(self, master: RedisServer) -> bool:
        r = master.client(socket_timeout=1)
        try:
            info = r.info("replication")
        except redis.RedisError:
            return False
        finally:
            r.close()
        offset = info.get("master_repl_offset", 0)
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                  and v.get("state") == "online" and v.get("offset", -1) >= offset]
        return len(online) == len(self.replicas)

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            r = sentinel.client(socket_timeout=1)
            try:
                if len(r.sentinel_slaves(MASTER_NAME)) < len(self.replicas):
                    return False
                if len(self.sentinels) > 1 and len(r.sentinel_sentinels(MASTER_NAME)) < len(self.sentinels) - 1:
                    return False
            except redis.RedisError:
                return False
            finally:
                r.close()
        return True

    @staticmethod
    def _wait(ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > end:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop sentinels first (so they do not fail over a master that is merely shutting down), then data."""
        for server in [*self.sentinels, *self.replicas, self.master]:
            server.stop()

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
