"""Where a worker process runs, for its heartbeat: host, pid and, under a `--gpus` supervisor, its GPUs.

The supervisor (spool.worker.supervisor) tells each worker process it starts which GPUs it drives and who started
it through two environment variables (spool.protocol.env: SPOOL_GPU_GROUP, SPOOL_SUPERVISOR). No torch here.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from spool.protocol.env import ENV_GPU_GROUP, ENV_SUPERVISOR, env_text

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def placement(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Heartbeat fields: host and pid; gpus and supervisor when a `--gpus` supervisor started this process."""
    out: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    gpus, supervisor = env_text(ENV_GPU_GROUP, env=env), env_text(ENV_SUPERVISOR, env=env)
    if gpus is not None:
        out["gpus"] = gpus
    if supervisor is not None:
        out["supervisor"] = supervisor
    return out


def supervisor_pid(env: Mapping[str, str] | None = None) -> int | None:
    """The pid of the supervisor that started this process (SPOOL_SUPERVISOR is host:pid), or None."""
    value = env_text(ENV_SUPERVISOR, env=env)
    if value is None:
        return None
    try:
        return int(value.rsplit(":", 1)[-1])
    except ValueError:
        return None


def follow_supervisor() -> None:
    """Under a supervisor: get SIGTERM (a warm stop) when it dies, so a SIGKILLed supervisor leaves no orphans.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op. If the supervisor is already gone, exit now.
    """
    pid = supervisor_pid()
    if pid is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != pid:  # it died before prctl took effect: nobody would tell us
        raise SystemExit(f"spool worker: the supervisor (pid {pid}) is gone")
