"""The in-flight table: what the worker remembers about each job it has handed to the engine."""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from spool.engine.outputs import RequestDelta
from spool.protocol import ErrorInfo, Job, TokenLogprob

log = logging.getLogger(__name__)


def new_run() -> str:
    """A fresh run id: tells the token events of two runs of one job apart."""
    return secrets.token_hex(6)


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
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    choices: list[ChoiceState] = field(default_factory=list)
    end_status: str | None = None  # set when the worker ends it early: cancelled / expired / failed
    end_error: ErrorInfo | None = None
    superseded: bool = False  # another worker owns or finished this job: abort quietly, write nothing
    quarantined: bool = False  # a suspect job (delivered too often): computed alone in its steps
    tool_mode: str | None = None  # spool.worker.chat: how the output becomes tool calls (None: it does not)
    tool_parser: str | None = None  # spool.worker.tool_calls parser for tool_mode "auto"
    run: str = field(default_factory=new_run)  # names this run's token events (spool.protocol.scripts.APPEND)
    seq: int = -1  # position of the last token event this run wrote (spool.worker.tokens advances it)
    stream_gap: bool = False  # some of its deltas were shed while Redis was away: the final write replays

    def mark_stream_gap(self) -> None:
        """One of this run's deltas was dropped: its stream no longer equals its output."""
        self.stream_gap = True

    def __post_init__(self) -> None:
        if not self.choices:
            want_lp = self.job.logprobs is not None
            self.choices = [ChoiceState(logprobs=[] if want_lp else None) for _ in range(self.job.n)]

    def apply(self, delta: RequestDelta) -> None:
        """Fold one engine delta into the accumulated choice."""
        choice = self.choices[delta.index]
        if delta.new_token_ids and self.first_token is None:
            self.first_token = time.time()
        choice.token_ids.extend(delta.new_token_ids)
        if delta.new_text:
            choice.text.append(delta.new_text)
        if delta.new_logprobs is not None and choice.logprobs is not None:
            choice.logprobs.extend(wire_logprobs(delta.new_logprobs))
        self.prompt_tokens = delta.num_prompt_tokens or self.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, delta.num_cached_tokens)
        if delta.finished:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            if delta.error and self.end_error is None:
                self.end_status, self.end_error = "failed", ErrorInfo(code="invalid_prompt", message=delta.error)

    @property
    def finished(self) -> bool:
        """True once every choice has a finish reason."""
        return all(c.finish_reason is not None for c in self.choices)


def wire_logprobs(positions) -> list[list[TokenLogprob]]:
    """Engine logprob dicts -> the wire's lists of TokenLogprob (logprob null for -inf)."""
    return [
        [TokenLogprob(token_id=t, logprob=lp.logprob if lp.logprob > float("-inf") else None, rank=lp.rank,
                      token=lp.decoded_token, bytes=list(lp.token_bytes) if lp.token_bytes is not None else None)
         for t, lp in pos.items()]
        for pos in positions
    ]


class InFlightTable:
    """The jobs this worker runs, by request id; ending one early goes through here and the engine's abort."""

    def __init__(self, abort: Callable[[str], None]):
        self._abort = abort  # the engine's abort: the request's last delta arrives with finish_reason "abort"
        self._jobs: dict[str, InFlight] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)

    def __contains__(self, rid: object) -> bool:
        return rid in self._jobs

    def get(self, rid: str) -> InFlight | None:
        """The job running under `rid`, if any."""
        return self._jobs.get(rid)

    def values(self) -> list[InFlight]:
        """A snapshot of the running jobs (safe to end them while iterating)."""
        return list(self._jobs.values())

    def entry_ids(self) -> set[str]:
        """Stream entry ids of every job held, superseded ones included (they are still in the engine)."""
        return {inf.entry_id for inf in self._jobs.values()}

    def add(self, inf: InFlight) -> None:
        """Remember a job the engine has accepted."""
        self._jobs[inf.id] = inf

    def remove(self, rid: str) -> None:
        """Forget a job whose last delta has arrived."""
        del self._jobs[rid]

    def supersede(self, rid: str, why: str) -> None:
        """Drop our run of `rid` without writing anything: another worker owns or finished the job."""
        inf = self._jobs.get(rid)
        if inf is None or inf.superseded:
            return
        log.warning("dropping job %s: %s", rid, why)
        inf.superseded = True
        self._abort(rid)

    def end_early(self, rid: str, status: str, code: str, message: str) -> None:
        """Abort a running job; its result (with partial text) is written when the engine reports the abort."""
        inf = self._jobs.get(rid)
        if inf is None or inf.end_status is not None or inf.superseded:
            return
        inf.end_status, inf.end_error = status, ErrorInfo(code=code, message=message)
        self._abort(rid)

    def abandon_all(self) -> list[InFlight]:
        """Leave every job unfinished (a stop): they stay pending in Redis for another worker; returns them."""
        abandoned = [inf for inf in self._jobs.values() if not inf.superseded]
        for inf in abandoned:
            inf.superseded = True
            self._abort(inf.id)
        return abandoned
