"""`spool serve` as a subprocess on a free loopback port, for tests and benchmarks.

torch, triton and transformers are made unimportable in it (as on a machine that has none of them), so every
request a test sends also proves that the gateway never loads the engine.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spool.testing.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
# `python -c` runs this, then spool's own entry point with the remaining arguments.
NO_TORCH = ("import sys\n"
            "for name in ('torch', 'triton', 'transformers'):\n"
            "    sys.modules[name] = None  # import raises ImportError\n"
            "from spool.cli.main import main\n"
            "sys.exit(main())\n")


class GatewayProcess:
    """One `spool serve` subprocess, logging to a file."""

    def __init__(self, redis_url: str, log_dir: str | os.PathLike[str], *extra: str, api_key: str | None = "test-key",
                 files_dir: str | os.PathLike[str] | None = None, port: int | None = None, name: str = "gateway",
                 env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.api_key = api_key
        self.log_path = Path(log_dir) / f"{name}.log"
        files = Path(files_dir) if files_dir is not None else Path(log_dir) / f"{name}-files"
        self.cmd = [sys.executable, "-c", NO_TORCH, "serve", "--port", str(self.port), "--redis-url", redis_url,
                    "--files-dir", str(files), "--no-access-log", *(["--api-key", api_key] if api_key else []),
                    *extra]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's base_url: http://127.0.0.1:PORT/v1"""
        return self.url + "/v1"

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        """Launch and wait until /health answers 200."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"spool serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"spool serve did not answer /health within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after `timeout`; returns the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return None if self.proc is None else self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        """Last lines of the log, for assertion messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextmanager
def gateway_deployment(model_dir: str | os.PathLike[str], root: Path, *gateway_args: str,
                       **gateway_kw) -> Iterator[tuple[str, GatewayProcess]]:
    """(redis url, gateway): a private redis-server, one live `spool worker` ("w1") on `model_dir` and a gateway
    in front of them (GatewayProcess(*gateway_args, **gateway_kw)); all stopped on exit."""
    from spool.producer import Client
    from spool.testing.chaos import WorkerProcess, wait_for
    from spool.testing.redis_server import RedisServer

    redis_server = RedisServer(root / "redis").start()
    worker = WorkerProcess(model_dir, redis_server.url, "w1", root, max_num_seqs=16).start()
    gateway = GatewayProcess(redis_server.url, root, *gateway_args, **gateway_kw).start()
    try:
        client = Client(redis_server.url)
        wait_for(lambda: client.redis.exists(client.keys.worker("w1")), 120, what="worker heartbeat")
        yield redis_server.url, gateway
    finally:
        gateway.stop()
        worker.stop()
        redis_server.stop()
