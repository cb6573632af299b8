"""A private redis-server on a free TCP port in a given dir, with stop/restart/kill: for tests and benchmarks."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from spool.producer.embedded import find_redis_server

ENV_TEST_SERVER = "SPOOL_TEST_REDIS_SERVER"  # pin the binary the tests use (else as spool.producer.embedded finds it)


def free_port() -> int:
    """A TCP port that was free a moment ago (the server start retries if another process takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process owned by a test: start(), stop(), restart() on the same port and dir, kill()."""

    def __init__(self, directory: str | os.PathLike[str], *, appendonly: bool = False,
                 appendfsync: str = "always", binary: str | None = None, port: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        # appendfsync always by default: a kill() right after a write must not make persistence tests flaky.
        self.appendonly, self.appendfsync = appendonly, appendfsync
        self.binary = binary or os.environ.get(ENV_TEST_SERVER) or find_redis_server()
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0"""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A new redis-py client for this server."""
        return redis.Redis.from_url(self.url, **kwargs)  # type: ignore[arg-type]

    def _write_config(self) -> Path:
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join([
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self.dir}"',
            'logfile "redis.log"',
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
            "",
        ]))
        return conf

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING; retries on a port taken meanwhile."""
        for _ in range(3):
            self.proc = subprocess.Popen([self.binary, str(self._write_config())], cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            if self._wait_up(timeout):
                return self
            self.kill()
            if "Address already in use" not in self.log_tail(3):
                break
            self.port = free_port()  # another process took the port between free_port() and bind
        raise RuntimeError(f"redis-server did not start on port {self.port}; log:\n{self.log_tail()}")

    def _wait_up(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        r = self.client(socket_timeout=1, socket_connect_timeout=1, retry=None)
        try:
            while time.monotonic() < end:
                if self.proc is not None and self.proc.poll() is not None:
                    return False
                try:
                    if r.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError):  # includes BusyLoadingError
                    time.sleep(0.01)
            return False
        finally:
            r.close()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log."""
        try:
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM: Redis fsyncs its AOF before exiting)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port and dir, reloading its AOF if enabled."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

