"""SequenceGrammar: one sequence's grammar state (an xgrammar GrammarMatcher) as the sampler and scheduler use it.

The matcher has accepted exactly the sequence's output tokens, always: the sampler fills its row of the
step's bitmask from it (engine/token_bitmask.py) and Scheduler.update_from_output accepts each appended
token. Preemption keeps a sequence's output tokens (only its KV cache is recomputed), so the matcher stays
as it is; nothing in the engine removes output tokens, hence nothing ever rolls a matcher back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(slots=True)
class SequenceGrammar:
    """A matcher plus why it stopped accepting, if it did."""

    matcher: Any  # xgrammar.GrammarMatcher (not imported here: the scheduler imports this module's users)
    error: str | None = None  # set when a sampled token was rejected (the mask should make that impossible)
    # xgrammar.BatchGrammarMatcher by thread count (1, many), made on first use. Waking threads costs ~0.1 ms,
    # which pays off only for large masks: measured on an H200 host (bench/structured_outputs.py), 256 rows
    # at a 99k vocabulary take 11 ms row by row and 4.8 ms on 8 threads; 64 rows at 512 ids are faster on one.
    _batch: ClassVar[dict[int, Any]] = {}
    _THREADED_FROM = 1 << 20  # rows x vocabulary at which the fill goes multi-threaded

    @classmethod
    def fill_many(cls, grammars: list[SequenceGrammar], bitmask) -> None:
        """Fill bitmask[j] for grammars[j], all rows in one xgrammar call (on several threads for big masks)."""
        threads = 1
        if len(grammars) * bitmask.shape[1] * 32 >= cls._THREADED_FROM:
            threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        batch = cls._batch.get(threads)
        if batch is None:
            import xgrammar as xgr

            batch = cls._batch[threads] = xgr.BatchGrammarMatcher(max_threads=threads)
        batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)

    @staticmethod
    def accept_many(grammars: list[SequenceGrammar], tokens: list[int]) -> list[bool]:
        """accept() for many rows in one xgrammar call: half the per-token cost of a Python loop (measured)."""
        import xgrammar as xgr

        accepted = xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g in grammars], tokens)
        for g, token, ok in zip(grammars, tokens, accepted):
            if not ok:
                g.error = f"the grammar rejected sampled token {token}"
        return accepted

    def fill_bitmask(self, bitmask, index: int) -> None:
        """Write the allowed next tokens into bitmask[index] (int32 words on the CPU, 1 bit = allowed)."""
        self.matcher.fill_next_token_bitmask(bitmask, index)

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False (and `error` set) if the grammar rejects it."""
        if self.matcher.accept_token(token):
            return True
        self.error = f"the grammar rejected sampled token {token}"
        return False

    @property
    def terminated(self) -> bool:
        """True once the grammar has accepted a stop token: nothing more may follow."""
        return self.matcher.is_terminated()
