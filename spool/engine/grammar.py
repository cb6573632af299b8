"""SequenceGrammar: one sequence's grammar state (an xgrammar GrammarMatcher) as the sampler and scheduler use it.

The matcher has accepted exactly the sequence's output tokens, always: the sampler fills its row of the
step's bitmask from it (spool/engine/token_bitmask.py) and Scheduler.update_from_output accepts each appended
token. Preemption keeps a sequence's output tokens (only its KV cache is recomputed), so the matcher stays
as it is; nothing in the engine removes output tokens, hence nothing ever rolls a matcher back.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar


def host_threads() -> int:
    """Threads for xgrammar's batch calls: half the CPUs this process may run on (the rest: the engine's own
    thread, tokenizers, the worker's Redis I/O), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))  # a container's CPU set, not the host's count
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 2
    return max(1, min(8, cpus // 2))


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
    # Accepts of this many rows or more are split over host_threads() threads (xgrammar releases the GIL):
    # ~7 µs a row on one thread (bench/grammar_step.py, Llama 3's vocabulary), on the critical path.
    _ACCEPT_CHUNK = 64
    _accept_pool: ClassVar[ThreadPoolExecutor | None] = None

    @classmethod
    def fill_many(cls, grammars: list[SequenceGrammar], bitmask) -> None:
        """Fill bitmask[j] for grammars[j], all rows in one xgrammar call (on several threads for big masks)."""
        threads = host_threads() if len(grammars) * bitmask.shape[1] * 32 >= cls._THREADED_FROM else 1
        batch = cls._batch.get(threads)
        if batch is None:
            import xgrammar as xgr

            batch = cls._batch[threads] = xgr.BatchGrammarMatcher(max_threads=threads)
        batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)

    @classmethod
    def accept_many(cls, grammars: list[SequenceGrammar], tokens: list[int]) -> list[bool]:
        """accept() for many rows in batched xgrammar calls (half a Python loop's cost per token, measured),
        split over threads for large batches."""
        handles = [g.matcher._handle for g in grammars]
        threads = min(host_threads(), len(grammars) // cls._ACCEPT_CHUNK)
        if threads <= 1:
            accepted = _batch_accept(handles, tokens)
        else:
            if cls._accept_pool is None:
                cls._accept_pool = ThreadPoolExecutor(max_workers=host_threads(), thread_name_prefix="grammar-accept")
            step = -(-len(handles) // threads)
            rest = [cls._accept_pool.submit(_batch_accept, handles[i:i + step], tokens[i:i + step])
                    for i in range(step, len(handles), step)]
            accepted = _batch_accept(handles[:step], tokens[:step])  # this thread takes the first chunk
            for part in rest:
                accepted += part.result()
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


def _batch_accept(handles: list, tokens: list[int]) -> list[bool]:
    """xgrammar's batch accept on matcher handles, without its wrapper's per-row conversion of the result
    (~1.4 µs a row): when no row rejected its token (always, under the mask) one C call says so."""
    from xgrammar.base import _core  # xgrammar 0.2.9 (pinned); BatchGrammarMatcher.batch_accept_token wraps this

    result = _core.BatchGrammarMatcher.batch_accept_token(handles, tokens, False)
    if 0 not in result:
        return [True] * len(handles)
    return [bool(ok) for ok in result]
