"""A real Redis Cluster of N masters on free loopback ports in a tmp dir: for tests and bench/scale_sim.py.

    with RedisCluster(tmp_path / "cluster", masters=3) as cluster:
        # redis://127.0.0.1:PORT/0 of one node; spool.protocol.connection sees cluster_enabled
        url = cluster.url
        cluster.kill(0); cluster.nodes[0].start()

Each node is a spool.testing.redis_server.RedisServer started with --cluster-enabled; `redis-cli --cluster
create` assigns the 16384 slots, and start() returns once every node reports cluster_state:ok.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from spool.testing.redis_server import RedisServer


def cluster_port() -> int:
    """A port <= 55535 that is free together with its cluster bus port (port + 10000)."""
    for _ in range(1000):
        port = random.randint(20_000, 55_535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNode(RedisServer):
    """One cluster-enabled redis-server (its nodes.conf lives in its own dir)."""

    def __init__(self, directory: str | os.PathLike[str], *, node_timeout_ms: int = 2000, **kwargs: object):
        kwargs.setdefault("port", cluster_port())  # the bus port is port + 10000: both must be free
        super().__init__(directory, **kwargs)  # type: ignore[arg-type]
        self.node_timeout_ms = node_timeout_ms

    def _write_config(self) -> Path:
        conf = super()._write_config()
        with conf.open("a") as f:
            f.write("\n".join([
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {self.node_timeout_ms}",
                # A node down must not make the whole cluster refuse the other nodes' slots (tests kill nodes).
                "cluster-require-full-coverage no",
                "",
            ]))
        return conf


def redis_cli() -> str:
    """The redis-cli binary (next to the redis-server in use, else on PATH)."""
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("redis-cli not found: install the redis-tools (Debian: redis-server) package")
    return found


class RedisCluster:
    """`masters` cluster-enabled redis-servers joined by `redis-cli --cluster create` (no replicas)."""

    def __init__(self, directory: str | os.PathLike[str], masters: int = 3, *, appendonly: bool = False):
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.dir = Path(directory)
        self.nodes = [ClusterNode(self.dir / f"node{i}", appendonly=appendonly) for i in range(masters)]

    @property
    def url(self) -> str:
        """A redis:// URL of one node: enough for a cluster client, which discovers the others."""
        return self.nodes[0].url

    @property
    def addresses(self) -> list[str]:
        """host:port of every node."""
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisCluster:
        """Start every node, create the cluster and wait for cluster_state:ok on all of them."""
        try:
            for node in self.nodes:
                node.start()
            proc = subprocess.run([redis_cli(), "--cluster", "create", *self.addresses, "--cluster-yes"],
                                  capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{proc.stdout}\n{proc.stderr}")
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Block until every running node reports cluster_state:ok and knows all the masters."""
        end = time.monotonic() + timeout
        while True:
            if all(self._node_ok(n) for n in self.nodes if n.running):
                return
            if time.monotonic() > end:
                raise RuntimeError("cluster did not reach cluster_state:ok:\n"
                                   + "\n".join(n.log_tail(5) for n in self.nodes))
            time.sleep(0.05)

    def _node_ok(self, node: ClusterNode) -> bool:
        r = node.client(socket_timeout=1, socket_connect_timeout=1)
        try:
            info = r.cluster("info")
            known = int(info.get("cluster_known_nodes", 0))
            return info.get("cluster_state") == "ok" and known == len(self.nodes)
        except redis.RedisError:
            return False
        finally:
            r.close()

    def client(self, **kwargs: object) -> redis.RedisCluster:
        """A redis-py RedisCluster client for this cluster."""
        return redis.RedisCluster.from_url(self.url, **kwargs)  # type: ignore[arg-type]

    def node_of(self, key: str) -> ClusterNode:
        """The node that holds `key`'s slot."""
        c = self.client()
        try:
            port = c.get_node_from_key(key).port
        finally:
            c.close()
        return next(n for n in self.nodes if n.port == port)

    def flush(self) -> None:
        """FLUSHALL on every master (tests that share one cluster per module start clean)."""
        for node in self.nodes:
            r = node.client()
            try:
                r.flushall()
            finally:
                r.close()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
