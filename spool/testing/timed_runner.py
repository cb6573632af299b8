"""The real LLMEngine (scheduler, block manager, async scheduling) on a simulated device: no model, timed steps.

`TimedRunner` stands in for ModelRunner. A launched step occupies a simulated device for a time that depends
on what the scheduler put in it (`StepCost`: a fixed part, the projections per token, attention by context
length), queued behind the step before it as on a GPU stream; `result()` sleeps until the device would have
finished it and returns one sampled token per sampling chunk. So everything above the runner is the code
that runs on the GPU (admission, chunked prefill, the priority reserve and hold-back, async scheduling's
one-step delay, the worker's launch/collect overlap), and a CPU can reproduce where wall time goes on the
device, at the device's pace: bench/e2e.py --sim, tests/test_interactive_ttft.py.

The default cost is fitted to the H200 llama3-8b measurements (StepCost says which): decode steps of ~23 ms at
512 sequences, 8,192-token prefill steps of ~190 ms, 13.6 s offline (bench/e2e.py --sim).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

from spool.engine.step_types import RunnerOutput, SchedulerOutput

SAMPLED_TOKEN = 1000  # every sampled token (workloads use ignore_eos, so its value never stops a sequence)


@dataclass(slots=True)
class StepCost:
    """Seconds a step takes on the simulated device: a roofline of one forward pass.

    overhead + max(weights read, projections for every token of the step) + attention: a decode row reads its
    context's KV (per context token; about twice as much when the step also carries prompt chunks, see below),
    a prompt chunk computes a (query, key) pair for each of its queries and the keys up to it.

    Defaults: llama3-8b bf16 on an H200, fitted to the GPU's own figures (bench/RESULTS.md, third session):
    - per token 21.1 us: a prefill-heavy step's GEMMs 161.2 ms + norms/activation/rotary/KV write 11.4 ms over
      ~8,190 tokens (run1 profile; decode steps: 11.8 ms over 512 rows, 23 us);
    - decode-only step 34 ns per context token: 10.4 ms of attention at 512 rows x ~600 tokens (run1, pure decode);
    - a decode row in a step with prompt chunks, 80 ns per context token, and a prompt (query, key) pair 4.3 ns:
      the prefill window's 18.8 ms of attention (steps 10-14: ~100k decode-row context tokens and ~2.5M prompt
      pairs per step). In such a step the kernel runs every sequence with prefill tiles of 32 query slots (x4
      heads of a group), so a decode row's one query costs the compute of 32 (16.8 MFLOP per context token, i.e.
      ~210 TFLOP/s, the kernel's prefill rate); the pair cost is ~120 TFLOP/s (short causal prompts);
    - overhead 2.5 ms (launch, sampling, host gaps): the offline workload in 13.6 s, 293 steps (GPU 13.35-13.66 s).
    Since the fourth session the kernel serves decode rows beside prompt chunks with decode tiles: on the H200
    the probed ratio at cap 2048 rose from 0.901 to 0.935 (bench/RESULTS.md, fourth session run4), between this
    model's 0.900 (80 ns) and its 0.972 with mixed_decode_ctx_s = decode_ctx_s. Not yet refitted: with split
    steps at cap 4096 (the default since the seventh session) bench/schedule_sim.py gives 0.984 (0.965 at 34 ns)
    against 0.943-0.948 measured (eighth and tenth sessions), and it predicted +0.9-1.1% for putting the bulk
    decodes into an interactive request's first step where the H200 showed +0.2% (bench/RESULTS.md, tenth
    session): read its differences between schedules as upper bounds.
    With these, bench/e2e.py's probed runs reproduce the GPU's bulk ratios (cap 2048: 0.900 vs 0.901 measured,
    cap 4096: 0.947 vs 0.934, no cap 0.971 vs 0.963) and TTFT p90 (184 vs 172 ms, 227 vs 250 ms). The earlier
    linear model (23.4 us per token + 20.5 us per decode row, context-blind) predicted 0.97-0.99 for all three.
    Not modelled: cuBLAS's step past a round batch (a decode step of 513 rows took 6.7% longer than one of 512 on
    the H200, twelfth session), which the scheduler avoids beside a full bulk batch (Scheduler._displaced_decodes).
    """

    overhead_s: float = 0.0025  # launches, sampling, the host sync
    weights_s: float = 0.0033  # the projections' floor: their weights read once (16 GB at ~4.8 TB/s)
    per_token_s: float = 21.1e-6  # projections, norms, activation per token computed
    decode_ctx_s: float = 34e-9  # a decode row's attention per context token, in a decode-only step
    mixed_decode_ctx_s: float = 80e-9  # the same in a step that also carries prompt chunks (prefill tiles)
    prompt_pair_s: float = 4.3e-9  # a prompt chunk's attention per (query, key) pair

    def seconds(self, sched: SchedulerOutput) -> float:
        """The step's device time: chunks of one token are decode rows, longer ones prompt chunks."""
        if not sched.chunks:
            return 0.0
        decode_ctx = pairs = 0
        for c in sched.chunks:
            n = len(c.token_ids)
            if n == 1:
                decode_ctx += c.start_pos + 1
            else:
                pairs += n * c.start_pos + n * (n + 1) // 2
        per_ctx = self.mixed_decode_ctx_s if pairs else self.decode_ctx_s
        return (self.overhead_s + max(self.weights_s, self.per_token_s * sched.num_batched_tokens)
                + per_ctx * decode_ctx + self.prompt_pair_s * pairs)


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
    import spool.engine.llm_engine as llm_engine

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
