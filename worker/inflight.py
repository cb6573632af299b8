"""What the worker remembers about each job it has handed to the engine, and how it becomes a Result."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.outputs import RequestDelta
from producer.results import Choice, ErrorInfo, Result, Timings, TokenLogprob, Usage
from producer.schema import Job

PRIORITY_RANK = {"interactive": 0, "bulk": 1}  # engine priority: lower runs first


@dataclass(slots=True)
class ChoiceState:
    """Accumulated output of one of the n completions."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class InFlight:
    """One job between admission and its final result."""

    id: str
    job: Job
    stream: str  # jobs stream it came from
    entry_id: str
    priority: str
    enqueued: float | None
    started: float
    deliveries: int = 1
    first_token: float | None = None
    prompt_tokens: int = 0
    choices: list[ChoiceState] = field(default_factory=list)
    end_status: str | None = None  # set when the worker ends it early: cancelled / expired / failed
    end_error: ErrorInfo | None = None
    superseded: bool = False  # another worker owns or finished this job: abort quietly, write nothing

    def __post_init__(self) -> None:
        if not self.choices:
            want_lp = self.job.logprobs is not None
            self.choices = [ChoiceState(logprobs=[] if want_lp else None) for _ in range(self.job.n)]

    def apply(self, d: RequestDelta) -> None:
        """Fold one engine delta into the accumulated choice."""
        c = self.choices[d.index]
        if d.new_token_ids and self.first_token is None:
            self.first_token = time.time()
        c.token_ids.extend(d.new_token_ids)
        if d.new_text:
            c.text.append(d.new_text)
        if d.new_logprobs is not None and c.logprobs is not None:
            c.logprobs.extend(wire_logprobs(d.new_logprobs))
        self.prompt_tokens = d.num_prompt_tokens or self.prompt_tokens
        if d.finished:
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
            if d.error and self.end_error is None:
                self.end_status, self.end_error = "failed", ErrorInfo(code="invalid_prompt", message=d.error)

    @property
    def finished(self) -> bool:
        """True once every choice has a finish reason."""
        return all(c.finish_reason is not None for c in self.choices)

    def result(self, worker: str) -> Result:
        """The final Result document."""
        choices = [
            Choice(index=i, text="".join(c.text), token_ids=c.token_ids, finish_reason=c.finish_reason,
                   stop_reason=c.stop_reason, logprobs=c.logprobs)
            for i, c in enumerate(self.choices)
        ]
        status = self.end_status or "completed"
        return Result(
            id=self.id,
            status=status,
            choices=choices,
            usage=Usage(prompt_tokens=self.prompt_tokens, completion_tokens=sum(len(c.token_ids) for c in self.choices)),
            error=self.end_error,
            timings=Timings(enqueued=self.enqueued, started=self.started, first_token=self.first_token,
                            finished=time.time()),
            metadata=self.job.metadata,
            worker=worker,
        )


def wire_logprobs(positions) -> list[list[TokenLogprob]]:
    """Engine logprob dicts -> the wire's lists of TokenLogprob (logprob null for -inf)."""
    out = []
    for pos in positions:
        out.append([
            TokenLogprob(token_id=t, logprob=lp.logprob if lp.logprob > float("-inf") else None, rank=lp.rank,
                         token=lp.decoded_token)
            for t, lp in pos.items()
        ])
    return out
