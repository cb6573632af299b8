"""The cyclic garbage collector around a run of engine steps (the offline LLM.generate; bench/host_overhead.py
--gc offline measures it).

Each decode step allocates a few GC-tracked objects per sequence (its scheduled chunk and token slice, its
delta and the delta's token list) that reference counting frees a step or two later. Python's young-generation
threshold (700 tracked allocations net of deallocations) then starts several young collections per step at
hundreds of sequences, each walking the step's live objects, and every tenth of them a middle-generation one:
~0.5-1 ms per step at 512 sequences on the CPU (bench/host_overhead.py). With the threshold above what a step
keeps alive, collections are left to real growth. The requests admitted before the run are frozen out of the
collector's reach (they are freed by reference counting; the worker does the same after each admission,
spool/worker/gc_pacing.py), so the full collections that still come walk only what is newer.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# Young-generation threshold per running sequence: a step allocates ~4-6 tracked objects per sequence and
# the previous step's are freed only after the next step's are made (async scheduling keeps one more step).
GEN0_PER_ROW = 16


def raise_young_threshold(threshold: int) -> tuple[int, ...]:
    """Raise the young generation's threshold to at least `threshold`; returns the thresholds before, for
    gc.set_threshold(*before) (step_gc here, the worker's GcPacer)."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], threshold), *old[1:])
    return old


@contextlib.contextmanager
def step_gc(max_rows: int) -> Iterator[None]:
    """Freeze what is alive now, and raise the young threshold to GEN0_PER_ROW * max_rows until the block ends
    (the previous thresholds are restored; frozen objects stay frozen, as after LLMEngine's start-up)."""
    gc.freeze()
    old = raise_young_threshold(GEN0_PER_ROW * max_rows)
    try:
        yield
    finally:
        gc.set_threshold(*old)
