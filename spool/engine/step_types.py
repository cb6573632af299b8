"""The records one engine step passes around: Scheduler -> ModelRunner -> LLMEngine -> Scheduler.

They live here, apart from all three, so that the runner depends on what a step carries, never on the
scheduler that builds it (model_runner.py imports nothing from scheduler.py, and the other way round).
The sampler is named in annotations only, so scheduler.py, through this module, still depends on no
device code (torch, the sampler).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spool.engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # an annotation only: see the module docstring
    import torch

    from spool.engine.grammar import SequenceGrammar
    from spool.engine.sampler import PendingSample
    from spool.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledChunk:
    """One sequence's slice of this step: tokens to compute, where they sit, and whether to sample after them."""

    seq_id: str
    token_ids: list[int]  # the tokens computed this step
    start_pos: int  # position of token_ids[0] (= tokens already in the KV cache)
    block_table: array  # int32 block ids (a copy)
    sample: bool  # the chunk reaches the sequence's end: sample its next token
    params: SamplingParams
    prompt_token_ids: list[int]
    all_token_ids: list[int]  # prompt + output so far (read-only view for penalties)
    seed: int | None
    grammar: SequenceGrammar | None  # the sequence's matcher (structured outputs); masks its sampling row


@dataclass(slots=True)
class SchedulerOutput:
    """What the runner must compute this step, plus sequences finished since the last step (to drop their state)."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    num_batched_tokens: int = 0
    finished_seq_ids: list[str] = field(default_factory=list)
    # Parallel to chunks, for the scheduler's own update: each chunk's sequence and its preemption generation.
    seqs: list[Sequence] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    # Async scheduling: indices of chunks whose last token was sampled by the previous (still unapplied) step;
    # their token_ids hold a placeholder there, and the runner reads the real id from that step's device tensor.
    device_input_rows: list[int] = field(default_factory=list)
    # Swap (spool/engine/swap.py): (sequence id, device blocks) to copy to host memory before this step runs, and
    # (sequence id, its new device blocks) to copy back into.
    swap_out: list[tuple[str, list[int]]] = field(default_factory=list)
    swap_in: list[tuple[str, list[int]]] = field(default_factory=list)


@dataclass(slots=True)
class RunnerOutput:
    """What the runner returns: one sampled token (and optional logprobs) per sampled sequence."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
    ranks: dict[str, dict[int, int]] = field(default_factory=dict)


@dataclass(slots=True)
class PendingStep:
    """A step the runner launched; result() waits for the device and returns the sampled tokens per sequence."""

    seq_ids: list[str]  # the sampled sequences, in sampler row order
    sample: PendingSample | None  # None when the step samples nothing

    @property
    def device_tokens(self) -> torch.Tensor | None:
        """The sampled ids [num_sampled] int64 on the device, before they reach the host (async scheduling)."""
        return None if self.sample is None else self.sample.tokens

    def result(self) -> RunnerOutput:
        """Wait for the device (the step's only host sync) and key the sampled tokens by sequence."""
        out = RunnerOutput()
        if self.sample is None:
            return out
        res = self.sample.result()
        out.sampled = dict(zip(self.seq_ids, res.token_ids))
        if res.logprobs.count(None) == len(res.logprobs):  # no row has logprobs (the common step): a C-speed check
            return out
        for sid, logprobs, ranks in zip(self.seq_ids, res.logprobs, res.ranks):
            if logprobs is not None:
                out.logprobs[sid] = logprobs
                out.ranks[sid] = ranks
        return out


@dataclass(slots=True)
class ForwardInFlight:
    """A step whose forward pass is queued but whose sampling is not yet (ModelRunner.launch_forward)."""

    sched: SchedulerOutput
    sample_rows: list[int]  # indices of the chunks whose logits are sampled, in row order
    logits: torch.Tensor | None  # [len(sample_rows), >= vocab] on the device; None when nothing is sampled here


@dataclass(slots=True)
class StepInFlight:
    """What LLMEngine.launch() hands its caller: what was scheduled and the device work producing its tokens."""

    sched: SchedulerOutput
    pending: PendingStep | None  # None when nothing ran (only deltas queued outside a step)
