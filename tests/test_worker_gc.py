"""GcPacer's young threshold: raised while the worker loop runs, the previous thresholds back after."""
from __future__ import annotations

import gc

from spool.worker.gc_pacing import GcPacer


def test_young_threshold_is_raised_while_active_and_restored():
    before = gc.get_threshold()
    pacer = GcPacer(young_threshold=before[0] + 5000)
    try:
        pacer.activate()
        assert gc.get_threshold() == (before[0] + 5000, *before[1:])
    finally:
        pacer.release()
    assert gc.get_threshold() == before
    gc.freeze()  # release() unfroze everything: leave the session's heap frozen as LLMEngine leaves it


def test_a_lower_figure_never_lowers_the_threshold():
    before = gc.get_threshold()
    pacer = GcPacer(young_threshold=1)
    try:
        pacer.activate()
        assert gc.get_threshold() == before
    finally:
        pacer.release()
    gc.freeze()
