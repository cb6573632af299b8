"""The README's main command, `spool demo`, works on a fresh state directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, SPOOL_STATE_DIR=str(tmp_path / "state"))
    env.pop("SPOOL_REDIS_URL", None)
    try:
        out = subprocess.run([sys.executable, "-m", "spool", "demo", "--jobs", "10", "--device", "cpu"],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    finally:
        from spool.producer.embedded import stop_local_redis

        stop_local_redis(tmp_path / "state")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "live tokens of" in out.stdout and "[done: completed" in out.stdout
    assert "10/10 completed" in out.stdout  # 4 prompts + 4 chats + the raw XADD + the live job
    assert "worker stopped gracefully (exit 0)" in out.stdout
