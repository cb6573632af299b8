"""`python -m spool.testing.faulty_worker worker ...`: a real `spool worker` whose engine steps fail on cue.

Test-only (never installed as a command): a step that computes a request whose prompt contains one of these
markers fails the way a real step can fail on a GPU:

- STEP-RAISE: the step's result raises a RuntimeError (a bug in sampling or detokenizing, say);
- STEP-LAUNCH-RAISE: launch() raises after the engine marked the step in flight (a failing forward pass);
- STEP-CUDA: the step's result raises torch.AcceleratorError("CUDA error: an illegal memory access ...");
- STEP-HANG: the step's result never comes (a hung kernel or collective): the watchdog must end the process.

The faults come from inside the engine's own calls (the pending step's result(), which collect() waits on,
and launch()), so the engine's state after them is what a real failure leaves.
"""
from __future__ import annotations

import sys
import time

import torch

from spool.engine.llm_engine import LLMEngine
from spool.cli.main import main

MARKERS = ("STEP-LAUNCH-RAISE", "STEP-RAISE", "STEP-CUDA", "STEP-HANG")
_launch = LLMEngine.launch


class _FailingResult:
    """Stands in for a launched step's PendingStep: result() fails as `kind` says."""

    def __init__(self, kind: str):
        self.kind = kind

    def result(self):
        if self.kind == "STEP-HANG":
            time.sleep(3600)
        if self.kind == "STEP-CUDA":
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered\n"
                                         "CUDA kernel errors might be asynchronously reported")
        raise RuntimeError("injected fault: a step that cannot be computed")


def _marker_of(engine: LLMEngine, step) -> str | None:
    for chunk in step.sched.chunks:
        request = engine.requests.get(chunk.seq_id.rsplit("#", 1)[0])
        prompt = (request.prompt or "") if request is not None else ""
        for marker in MARKERS:
            if marker in prompt:
                return marker
    return None


def _launch_with_faults(self: LLMEngine):
    step = _launch(self)
    marker = _marker_of(self, step)
    if marker == "STEP-LAUNCH-RAISE":
        raise RuntimeError("injected fault: the forward pass failed to launch")
    if marker is not None:
        step.pending = _FailingResult(marker)
    return step


LLMEngine.launch = _launch_with_faults  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
