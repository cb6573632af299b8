"""Failure-injection helpers shared by the crash tests and bench/soak.py: worker subprocesses and the audit.

The audit checks the promise "every accepted job ends with exactly one final result" from the outside, the
way a client sees it: the result key exists and the token stream holds exactly one `done` entry (the final
write appends it only when it wins, so a second final result would show up as a second `done`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import redis

from spool.protocol.keys import Keys

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """One `spool worker` subprocess on the CPU, logging to a file."""

    def __init__(self, model: str | os.PathLike[str], url: str, name: str, log_dir: Path, *extra: str,
                 claim_idle_ms: int = 1000, max_num_seqs: int = 4, env: dict[str, str] | None = None,
                 module: str = "spool"):
        self.name, self.log_path = name, Path(log_dir) / f"{name}.log"
        self.cmd = [sys.executable, "-m", module, "worker", "--model", str(model), "--redis-url", url,
                    "--device", "cpu", "--name", name, "--claim-idle-ms", str(claim_idle_ms),
                    "--max-num-seqs", str(max_num_seqs), "--block-size", "8", "--heartbeat-s", "0.5",
                    "--block-ms", "200", "--grace-period-s", "5", *extra]
        # One thread per worker: several share a small CI machine; torch would oversubscribe it otherwise.
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Launch the process (model loading continues in the background)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        return self

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash mid-generation, nothing flushed."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after `timeout`; returns the exit code."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return None if self.proc is None else self.proc.returncode

    def log_tail(self, n: int = 30) -> str:
        """Last lines of the log, for assertion messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_for(pred, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll pred() until truthy; returns its value or raises TimeoutError."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = pred()
        except (redis.ConnectionError, redis.TimeoutError):
            v = None  # Redis is restarting under us: keep polling
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s")


def count_results(r: redis.Redis, keys: Keys, ids: list[str]) -> int:
    """How many of `ids` have a result key."""
    n = 0
    for i in range(0, len(ids), 500):
        pipe = r.pipeline(transaction=False)
        for rid in ids[i:i + 500]:
            pipe.exists(keys.result(rid))
        n += sum(pipe.execute())
    return n


@dataclass(slots=True)
class Audit:
    """What happened to a set of request ids."""

    jobs: int = 0
    lost: list[str] = field(default_factory=list)  # accepted, but no result
    duplicates: list[str] = field(default_factory=list)  # more than one done entry (more than one final)
    no_done: list[str] = field(default_factory=list)  # a token stream without its done entry
    restarts: int = 0  # restart events seen (jobs that were rerun)
    statuses: dict[str, int] = field(default_factory=dict)
    codes: dict[str, str] = field(default_factory=dict)  # id -> error code, for failed results

    @property
    def ok(self) -> bool:
        """No job lost, none with two final results."""
        return not self.lost and not self.duplicates and not self.no_done

    def summary(self) -> dict:
        """Counts (and a few example ids) as a JSON-friendly dict."""
        return {"jobs": self.jobs, "lost": len(self.lost), "duplicates": len(self.duplicates),
                "missing_done": len(self.no_done), "restarts": self.restarts, "statuses": self.statuses,
                "examples": {"lost": self.lost[:5], "duplicates": self.duplicates[:5], "no_done": self.no_done[:5]}}


def audit(r: redis.Redis, keys: Keys, ids: list[str]) -> Audit:
    """Read every id's result and token stream and count finals."""
    a = Audit(jobs=len(ids))
    for i in range(0, len(ids), 200):
        chunk = ids[i:i + 200]
        pipe = r.pipeline(transaction=False)
        for rid in chunk:
            pipe.get(keys.result(rid))
            pipe.xrange(keys.tokens(rid))
        replies = pipe.execute()
        for j, rid in enumerate(chunk):
            raw, entries = replies[2 * j], replies[2 * j + 1]
            kinds = [f.get(b"type") for _, f in entries]
            dones, a.restarts = kinds.count(b"done"), a.restarts + kinds.count(b"restart")
            if raw is None:
                a.lost.append(rid)
                continue
            doc = orjson.loads(raw)
            a.statuses[doc["status"]] = a.statuses.get(doc["status"], 0) + 1
            if doc.get("error"):
                a.codes[rid] = doc["error"]["code"]
            if dones > 1:
                a.duplicates.append(rid)
            elif dones == 0 and entries:  # no stream at all: a non-streamed job's done marker expired
                a.no_done.append(rid)
    return a
