"""GrammarGate: structured-output requests whose grammar is still compiling wait here, outside the scheduler.

LLMEngine.add_request hands over a request's sequences with its spec; on a cache hit they come straight
back ready (a matcher each), otherwise they wait while a pool thread compiles, and LLMEngine.launch() polls
before scheduling. Running requests never wait for a compile: the scheduler does not see these sequences.
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

from spool.engine.sequence import Sequence
from spool.engine.structured_outputs import StructuredOutputsParams

INVALID_PREFIX = "invalid_structured_output: "


@dataclass(slots=True)
class Compiled:
    """A request whose grammar is settled: its sequences hold matchers, or the spec did not compile."""

    request_id: str
    seqs: list[Sequence]
    error: str | None  # "invalid_structured_output: <why>" when the spec failed; the sequences have no matcher


class GrammarGate:
    """Requests waiting for their grammar, and the compile cache they wait on (built on first use)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], compile_timeout_s: float = 60.0):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        # A request whose grammar is not compiled this long after it arrived fails (its compile cannot be
        # interrupted, but nobody waits for it, and its spec fails at once from then on).
        self.compile_timeout_s = compile_timeout_s
        self._cache = None  # GrammarCache: importing xgrammar waits for the first structured request
        self._waiting: dict[str, tuple[Future, list[Sequence], float]] = {}  # future, sequences, deadline

    @property
    def cache(self):
        """The GrammarCache (xgrammar, LRU, compile pool)."""
        if self._cache is None:
            from spool.engine.grammar_compiler import GrammarCache  # lazy: xgrammar loads only when used

            self._cache = GrammarCache(self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self._cache

    def __len__(self) -> int:
        return len(self._waiting)

    def submit(self, request_id: str, spec: StructuredOutputsParams, seqs: list[Sequence]) -> Compiled | None:
        """Settled at once (cache hit, or no tokenizer), else None: the sequences wait here until poll()."""
        if self.tokenizer is None:
            return Compiled(request_id, seqs, INVALID_PREFIX + "structured outputs need the model's tokenizer")
        fut = self.cache.get(spec)
        if fut.done():
            return self._settle(request_id, fut, seqs)
        self._waiting[request_id] = (fut, seqs, time.monotonic() + self.compile_timeout_s)
        return None

    def poll(self) -> list[Compiled]:
        """The waiting requests whose compile has finished or timed out, in the order they were submitted."""
        now = time.monotonic()
        settled = []
        for rid in [rid for rid, (fut, _, deadline) in self._waiting.items() if fut.done() or now >= deadline]:
            fut, seqs, _ = self._waiting.pop(rid)
            if fut.done():
                settled.append(self._settle(rid, fut, seqs))
            else:
                reason = f"the grammar did not compile within {self.compile_timeout_s:g} s"
                self.cache.give_up(fut, reason)  # later requests for this spec fail at once
                settled.append(Compiled(rid, seqs, INVALID_PREFIX + reason))
        return settled

    def wait(self, timeout: float) -> None:
        """Block until some waiting compile finishes or `timeout` seconds pass (for an otherwise idle engine)."""
        if self._waiting:
            wait([fut for fut, _, _ in self._waiting.values()], timeout=timeout, return_when=FIRST_COMPLETED)

    def discard(self, request_id: str) -> list[Sequence]:
        """Stop waiting for a request (aborted); returns its sequences (empty if it was not waiting)."""
        entry = self._waiting.pop(request_id, None)
        return [] if entry is None else entry[1]

    def num_waiting(self, priority: int) -> int:
        """Sequences waiting here at `priority` or better (admission counts them as if queued)."""
        return sum(1 for _, seqs, _ in self._waiting.values() for s in seqs if s.priority <= priority)

    def _settle(self, request_id: str, fut: Future, seqs: list[Sequence]) -> Compiled:
        if fut.cancelled():
            return Compiled(request_id, seqs, INVALID_PREFIX + "the compile was cancelled")
        err = fut.exception()
        if err is not None:
            return Compiled(request_id, seqs, INVALID_PREFIX + str(err))
        compiled = fut.result()
        for seq in seqs:
            seq.grammar = self.cache.matcher(compiled)  # one matcher per sequence (n > 1 diverge)
        return Compiled(request_id, seqs, None)
