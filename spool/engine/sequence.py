"""Sequence: one completion stream of one request, the unit the scheduler batches."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spool.engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # an annotation only: the scheduler never needs xgrammar
    from spool.engine.grammar import SequenceGrammar


class SeqStatus(enum.Enum):
    """Lifecycle of a sequence inside the engine."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Token ids and progress of one completion; `num_computed_tokens` catches up with `num_tokens`."""

    seq_id: str
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None
    priority: int
    arrival: int  # monotonically increasing admission counter: FCFS order within a priority
    isolated: bool = False  # runs in steps of its own request only (the worker's quarantine of a suspect job)
    token_ids: list[int] = field(default_factory=list)  # prompt + output, appended in place
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens the prefix cache held at first admission (-1: not admitted yet)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    grammar: SequenceGrammar | None = None  # structured outputs: has accepted exactly the output tokens
    # Async scheduling: tokens sampled by launched steps whose results are not applied yet (0 or 1). The newest
    # is on the device only; the next step reads it there (see spool/engine/async_step.py).
    num_pending_tokens: int = 0
    generation: int = 0  # bumped at each preemption: results of steps launched before it carry no KV for it
    max_num_tokens: int = 0  # prompt + max_tokens, capped at max_model_len (set by Scheduler.add)
    swapped_tokens: int = 0  # preempted by swap: computed tokens whose KV waits in host memory (spool/engine/swap.py)
    swapped_blocks: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens so far."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """num_tokens plus the pending ones: where num_computed_tokens must catch up to."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def needs_host_history(self) -> bool:
        """Sampling reads this sequence's output tokens on the host (grammar, penalties, min_tokens), so its next
        step cannot sample before the previous one's token is applied: async scheduling splits the launch."""
        p = self.params
        return (self.grammar is not None or p.min_tokens > 0 or p.presence_penalty != 0.0
                or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival)

    @property
    def finished(self) -> bool:
        """True once the sequence has a finish reason."""
        return self.status is SeqStatus.FINISHED
