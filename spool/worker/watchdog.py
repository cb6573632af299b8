"""The step watchdog: a worker whose engine step hangs past step_timeout_s exits, so its jobs go elsewhere.

A hung CUDA call (a deadlocked collective, a kernel that never ends, a wedged driver) cannot be interrupted
from Python: the main thread never returns to the loop, its leases lapse, and the jobs would be reclaimed
while the process holds the GPU for ever. A daemon thread watches the time the current engine call has
taken and ends the process with os._exit (after a log line) when it passes the limit; a supervisor
restarts it, and another worker reclaims the jobs after claim_idle_ms (counted as a delivery, as after a
crash: a job that hangs every worker it meets ends as a poison job).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

EXIT_STEP_HUNG = 8  # `spool worker` exit code: an engine step hung past --step-timeout-s (docs/OPERATIONS.md)


class StepWatchdog:
    """Times engine calls made inside guard(); step_timeout_s <= 0 turns it off."""

    def __init__(self, step_timeout_s: float, what: str = "engine step"):
        self.step_timeout_s = step_timeout_s
        self.what = what
        self._since: float | None = None  # monotonic start of the guarded call running now
        self._label = ""
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """True when a limit is set."""
        return self.step_timeout_s > 0

    def start(self) -> None:
        """Start the watching thread (once)."""
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="spool-step-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def guard(self, label: str) -> Iterator[None]:
        """Time the engine call inside the block."""
        self._label, self._since = label, time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        # Checking a few times per limit bounds how late the exit comes (at most a quarter of the limit).
        period = min(1.0, self.step_timeout_s / 4)
        while True:
            time.sleep(period)
            since = self._since
            if since is not None and time.monotonic() - since > self.step_timeout_s:
                self._fire(time.monotonic() - since)

    def _fire(self, elapsed: float) -> None:
        log.critical("%s (%s) has run for %.1fs, past the %.1fs limit (--step-timeout-s): the device is hung; "
                     "exiting with code %d, running jobs stay pending for another worker",
                     self.what, self._label, elapsed, self.step_timeout_s, EXIT_STEP_HUNG)
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001 - leaving is what matters now
                pass
        sys.stderr.flush()
        os._exit(EXIT_STEP_HUNG)  # a hung CUDA call never returns: no cleanup can run on the main thread
