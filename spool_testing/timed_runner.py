"""The real LLMEngine (scheduler, block manager, async scheduling) on a simulated device: no model, timed steps.

`TimedRunner` stands in for ModelRunner. A launched step occupies a simulated device for a time that depends
on what the scheduler put in it (`StepCost`: a fixed part, a part per decode sequence, a part per prompt
token), queued behind the step before it as on a GPU stream; `result()` sleeps until the device would have
finished it and returns one sampled token per sampling chunk. So everything above the runner is the code
that runs on the GPU (admission, chunked prefill, the priority reserve and hold-back, async scheduling's
one-step delay, the worker's launch/collect overlap), and a CPU can reproduce where wall time goes on the
device, at the device's pace: bench/e2e.py --sim, tests/test_interactive_ttft.py.

The default cost is calibrated to issue 17's H200 llama3-8b measurement: decode steps of ~25 ms at 512
sequences, the workload's 297k prompt tokens in ~7 s of prefill, 13.8 s offline (bench/e2e.py --sim).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

from engine.step_types import RunnerOutput, SchedulerOutput

SAMPLED_TOKEN = 1000  # every sampled token (workloads use ignore_eos, so its value never stops a sequence)


@dataclass(slots=True)
class StepCost:
    """Seconds a step takes on the simulated device: a roofline of one forward pass.

    overhead + max(weights read, compute for every token of the step) + KV reads of the decode rows. The
    projections read the weights once per step and compute per token (decode rows and prompt tokens alike);
    each decode row's attention reads its KV. Defaults: llama3-8b bf16 on an H200 (16 GB of weights at
    ~4.8 TB/s; 23.4 us per token, i.e. the workload's 297k prompt tokens in ~7 s and an 8,192-token step in
    ~190 ms; a 512-row decode step ~25 ms, a 26-row one ~6 ms).
    """

    overhead_s: float = 0.0025  # launches, sampling, the host sync
    weights_s: float = 0.0033  # the projections' floor: their weights read once
    per_token_s: float = 23.4e-6  # projection and attention compute per token computed
    per_decode_s: float = 20.5e-6  # a decode row's KV read

    def seconds(self, sched: SchedulerOutput) -> float:
        """The step's device time: chunks of one token are decode rows, longer ones prompt chunks."""
        if not sched.chunks:
            return 0.0
        decodes = sum(1 for c in sched.chunks if len(c.token_ids) == 1)
        return (self.overhead_s + max(self.weights_s, self.per_token_s * sched.num_batched_tokens)
                + self.per_decode_s * decodes)


class _Pending:
    """A launched step: result() waits for the simulated device to finish it."""

    __slots__ = ("done_at", "sampled")

    def __init__(self, done_at: float, sampled: list[str]):
        self.done_at, self.sampled = done_at, sampled

    def result(self) -> RunnerOutput:
        left = self.done_at - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return RunnerOutput(sampled=dict.fromkeys(self.sampled, SAMPLED_TOKEN))


class TimedRunner:
    """ModelRunner's surface for LLMEngine, over a simulated device that runs launched steps one after another."""

    def __init__(self, cost: StepCost, num_blocks: int):
        self.cost = cost
        self.num_blocks = num_blocks
        self.device = "sim"  # str() in the heartbeat and the start-up summary
        self.dtype = "none"
        self.bytes_per_block = 1 << 20  # no swap space (swap_space_bytes=0)
        self.kv_caches = []
        self.graphs = None
        self._free_at = 0.0  # perf_counter time at which the device has finished every launched step
        self.busy_s = 0.0  # device time of every step launched
        self.steps: list[tuple[float, float, int, int]] = []  # (start, seconds, decode rows, prompt tokens)
        self._lock = threading.Lock()

    def launch(self, sched: SchedulerOutput, previous=None) -> _Pending:
        """Queue the step behind the ones still on the device; returns at once."""
        seconds = self.cost.seconds(sched)
        with self._lock:
            start = max(time.perf_counter(), self._free_at)
            self._free_at = start + seconds
            self.busy_s += seconds
            decodes = sum(1 for c in sched.chunks if len(c.token_ids) == 1)
            self.steps.append((start, seconds, decodes, sched.num_batched_tokens - decodes))
            done_at = self._free_at
        return _Pending(done_at, [c.seq_id for c in sched.chunks if c.sample])

    def idle_s(self, since: float, until: float) -> float:
        """Seconds in [since, until] during which the device had no launched step to compute."""
        busy = 0.0
        for start, seconds, _, _ in self.steps:
            lo, hi = max(start, since), min(start + seconds, until)
            busy += max(0.0, hi - lo)
        return max(0.0, (until - since) - busy)


@contextlib.contextmanager
def timed_runner(cost: StepCost | None = None, num_blocks: int = 56024) -> Iterator[SimpleNamespace]:
    """While inside, engines built (LLMEngine, LLM) run on a TimedRunner; `.runner` is the last one built.

    56,024 blocks of 16 tokens is the KV cache of llama3-8b on an H200 at 0.9 memory utilization.
    """
    import engine.llm_engine as llm_engine

    made = SimpleNamespace(runner=None)

    def make(config, model_cfg, max_model_len):
        made.runner = TimedRunner(cost or StepCost(), config.num_kv_blocks or num_blocks)
        return made.runner

    original = llm_engine.make_runner
    llm_engine.make_runner = make
    try:
        yield made
    finally:
        llm_engine.make_runner = original
