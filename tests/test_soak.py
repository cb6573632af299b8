"""bench/soak.py stays runnable: a short soak with worker kills and Redis restarts audits clean."""
from __future__ import annotations

import json
import subprocess
import sys

from spool.testing.chaos import ROOT


def test_short_soak_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "bench/soak.py", "--duration", "12", "--workers", "2", "--kill-every", "4",
                           "--restart-redis-every", "5", "--rate", "10", "--hidden-size", "64", "--layers", "2",
                           "--hostile-fraction", "0.3", "--quiesce-timeout", "60", "--client-kill-every", "1",
                           "--oom-every", "4", "--freeze-redis-every", "5", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["ok"] and fig["jobs_lost"] == 0 and fig["duplicate_final_results"] == 0
    assert fig["workers_killed"] >= 1 and fig["redis_restarts"] >= 1 and fig["bad_inputs_tried"] >= 5
    assert fig["jobs_run"] >= 50 and fig["worker_crashes"] == 0
    assert fig["history_problems"] == 0 and fig["client_kills"] >= 1 and fig["redis_ooms"] >= 1
