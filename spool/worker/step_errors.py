"""An exception inside an engine step: fail that step's jobs (`engine_error`) and go on, or leave on a device error.

Two kinds of step failure, told apart by the exception:

- a device error (a CUDA error, an illegal memory access, a device-side assert, an ECC or NCCL failure, a
  tensor-parallel rank that died or hung):
  the CUDA context is poisoned and every later kernel launch fails too, so the process must go. The
  worker stops at once with EXIT_DEVICE_ERROR and writes nothing for its running jobs: they stay pending
  and another worker reclaims them after claim_idle_ms, the delivery counted as for a crash (the device
  error may be the job's doing, so quarantine may see it).
- anything else (a bug in a logits processor, a detokenizer that chokes on one request): the jobs of the
  failed step end with a failed result, code `engine_error`, their partial output kept; other running jobs
  and the worker go on.

The recovery uses only the engine's public calls: abort() frees a request's KV blocks and queues its final
delta; collect() of an empty step after a failed launch() hands out the queued deltas (and, with async
scheduling, applies the step launched before the failed one). A launch() that raised leaves no step in
flight, and a collect() that raised keeps the deltas queued outside the step for the next collect().
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from spool.engine import LLMEngine, TensorParallelError
from spool.engine.step_types import PendingStep, SchedulerOutput, StepInFlight
from spool.worker.inflight import InFlight, InFlightTable

log = logging.getLogger(__name__)

EXIT_DEVICE_ERROR = 7  # `spool worker` exit code: the device failed; its jobs stay pending (docs/OPERATIONS.md)
ENGINE_ERROR = "engine_error"

# Message fragments of errors after which the CUDA context cannot be trusted (torch wraps most of them in
# torch.AcceleratorError since 2.8; older versions and other libraries raise a RuntimeError with this text).
_DEVICE_FATAL_TEXT = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access",
                      "NCCL error", "uncorrectable ECC", "CUDA driver error")


def is_device_fatal(error: BaseException) -> bool:
    """True for an error that leaves the device unusable (the worker must exit), False for one step's failure.

    A CUDA out-of-memory error is not fatal: torch raises it before launching anything, the context is intact.
    """
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if isinstance(error, TensorParallelError):  # a rank died or hung: the model is gone with it
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    text = str(error)
    return any(fragment in text for fragment in _DEVICE_FATAL_TEXT)


def describe(error: BaseException) -> str:
    """One line for a result's error message and the log: the type and the first line of the message."""
    first = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}"[:500]


@dataclass(slots=True)
class StepFailure:
    """What the worker loop must do after a step raised."""

    fatal: bool  # a device error: leave now, jobs stay pending
    deltas: list  # final deltas the recovery collected (publish them as usual)
    finished: list[InFlight]  # jobs the failed step ended: write their results now (unless superseded)


def recover(engine: LLMEngine, inflight: InFlightTable, error: BaseException,
            step: StepInFlight | None) -> StepFailure:
    """Fail the jobs of a step that raised (launch() when `step` is None, else collect(step)) and bring the
    engine back to a state where the next step can run; nothing is done for a device error but report it."""
    if is_device_fatal(error):
        log.critical("device error in an engine step: %s; leaving now, %d running jobs stay pending for "
                     "another worker", describe(error), len(inflight), exc_info=error)
        return StepFailure(True, [], [])
    log.error("engine step failed: %s; its jobs fail with %s, the worker goes on", describe(error), ENGINE_ERROR,
              exc_info=error)
    if step is not None:
        touched = {chunk.seq_id.rsplit("#", 1)[0] for chunk in step.sched.chunks}
    else:  # launch() raised after schedule(): every running sequence may have been scheduled (and advanced)
        touched = {seq.request_id for seq in engine.scheduler.running}
    message = f"the engine step computing this job failed: {describe(error)}"
    finished = []
    for rid in touched:
        inf = inflight.get(rid)
        if inf is None:
            engine.abort(rid)  # not a job of ours (superseded and gone): still free its blocks
            continue
        # Aborting frees the blocks whose KV the failed step never wrote. The job ends here, not when its
        # abort delta comes: a collect() that raised half-way may have finished a sequence without its delta.
        inflight.end_early(rid, "failed", ENGINE_ERROR, message)
        finished.append(_close(inflight, inf))
    deltas = engine.collect(StepInFlight(SchedulerOutput(), PendingStep([], None))) if step is None else []
    # A collect() that raised took the final deltas queued during the step with it (cancels, requests failed
    # before they ran): their jobs would wait for ever. The engine no longer holds them as running.
    for inf in inflight.values():
        output = engine.get_request_output(inf.id)
        if output is not None and not output.finished:
            continue
        if any(d.request_id == inf.id and d.finished for d in deltas):
            continue
        inflight.end_early(inf.id, "failed", ENGINE_ERROR, message)
        finished.append(_close(inflight, inf))
    return StepFailure(False, deltas, finished)


def _close(inflight: InFlightTable, inf: InFlight) -> InFlight:
    """Take a job the failed step ended out of the table, every choice finished (its result is written now)."""
    for choice in inf.choices:
        if choice.finish_reason is None:
            choice.finish_reason = "error"
    inflight.remove(inf.id)
    return inf
