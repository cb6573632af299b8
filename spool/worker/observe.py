"""ObservedFinisher: the Finisher that also reports every final result to the job log and the metrics.

Every way a job ends (completed, rejected, cancelled, expired, poison) passes through Finisher.final, so one
override sees them all, with the Result document that is written (status, usage, timings).
"""
from __future__ import annotations

from typing import Any

from spool.protocol import Result
from spool.worker.finish import Finisher
from spool.worker.joblog import JobLog
from spool.worker.metrics import WorkerMetrics


class ObservedFinisher(Finisher):
    """Finisher that reports each final result to the job log and the metrics, and counts dead letters."""

    job_log: JobLog | None = None
    metrics: WorkerMetrics | None = None

    def final(self, rid: str, result: Result, stream: str, entry_id: str, **kwargs: Any) -> None:
        """Queue the final write (Finisher.final), then report it."""
        super().final(rid, result, stream, entry_id, **kwargs)
        # Metrics first: whoever reads the job's log line and then scrapes (a test, an operator) finds it counted.
        if self.metrics is not None:
            self.metrics.on_final(result, stream)
        if self.job_log is not None:
            self.job_log.on_final(result, stream)

    def dead_letter(self, *args: Any, **kwargs: Any) -> None:
        """Queue the dead letter (Finisher.dead_letter), then count it."""
        super().dead_letter(*args, **kwargs)
        if self.metrics is not None:
            self.metrics.on_dead_letter()
