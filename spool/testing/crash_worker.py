"""`python -m spool.testing.crash_worker worker ...`: a real `spool worker` whose process dies the moment
an engine step computes a request whose prompt contains SPOOL_CRASH_MARKER (default "POISON-PILL").

It stands in for a job that really kills workers (a kernel fault, an OOM on one input): the process ends
with os._exit, as a segfault would, so nothing is flushed and no stop handler runs.
"""
from __future__ import annotations

import os
import sys

from spool.engine.llm_engine import LLMEngine
from spool.cli.main import main

MARKER = os.environ.get("SPOOL_CRASH_MARKER", "POISON-PILL")
_launch = LLMEngine.launch


def _launch_or_die(self: LLMEngine):
    step = _launch(self)
    for chunk in step.sched.chunks:
        request = self.requests.get(chunk.seq_id.rsplit("#", 1)[0])
        if request is not None and MARKER in (request.prompt or ""):
            os._exit(86)
    return step


LLMEngine.launch = _launch_or_die  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
