"""Keep the cyclic garbage collector's full collections off the engine's step path.

A full collection walks every tracked object. With 512 jobs in flight (each prompt and output held as lists
by the job document, the engine's sequence and the in-flight table) one took ~40 ms on the CPU simulation,
every ~1.1 s (every ~44 decode steps of 25 ms), and the device idled for most of it (bench/e2e.py --sim, the
gaps lined up with the collections). Those objects live until their job ends and are then freed by reference
counting: cycles among them are practically absent (22 objects collected in a whole 512-job run). So after
each admission everything alive is frozen (gc.freeze, O(1)), as LLMEngine freezes its start-up heap, and
collections walk only what is newer. A cycle that forms among frozen objects would be kept until the next
full collection, which runs when the worker is idle, at most every `full_every_s`; a stopping worker hands
everything back to the collector (release). While the loop runs, the young generation's threshold is raised to
`young_threshold` (the worker: spool.engine.step_gc's per-row figure times the engine's rows), so the few objects per
sequence that each step makes and frees do not start several young collections per step.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable

from spool.engine.step_gc import raise_young_threshold


class GcPacer:
    """Freezes admitted jobs' objects out of the collector's way; collects everything while idle.

    Active only while the worker loop runs (Worker.run): a worker driven tick by tick (tests) freezes nothing.
    """

    def __init__(self, full_every_s: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 young_threshold: int = 0):
        self.full_every_s = full_every_s
        self.clock = clock
        self.young_threshold = young_threshold
        self.active = False
        self._next_full = 0.0
        self._thresholds: tuple[int, ...] | None = None  # the collector's thresholds before activate()
        self.full_collections = 0

    def activate(self) -> None:
        """The worker loop starts."""
        self.active = True
        self._next_full = self.clock() + self.full_every_s
        self._thresholds = raise_young_threshold(self.young_threshold)

    def admitted(self) -> None:
        """Jobs were just handed to the engine: freeze everything alive, them included."""
        if self.active:
            gc.freeze()

    def idle(self) -> None:
        """Nothing is computing: a full collection costs no step; at most every full_every_s."""
        if self.active and self.clock() >= self._next_full:
            self.collect_all()

    def release(self) -> None:
        """The worker loop ends: everything frozen is the collector's again (its next full collection walks it,
        the engine's start-up heap included, until something freezes it again)."""
        if self.active:
            self.active = False
            gc.unfreeze()
            if self._thresholds is not None:
                gc.set_threshold(*self._thresholds)

    def collect_all(self) -> None:
        """Unfreeze, collect everything, freeze what survives (the engine's start-up heap included)."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.full_collections += 1
        self._next_full = self.clock() + self.full_every_s
