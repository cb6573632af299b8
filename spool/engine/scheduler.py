"""Scheduler: each step, every sequence's num_computed_tokens catches up with its num_tokens under a token budget.

Decode, chunked prefill and prefix-cache hits all fall out of that one rule. Running sequences go first
(oldest/highest priority first); when KV blocks run out, the lowest-priority newest running sequence is
preempted (its blocks freed, its progress reset, recomputed later; or, with at least swap_min_tokens
computed, its KV copied to host memory and back when it resumes: spool/engine/swap.py). Waiting sequences are
admitted while the budget, max_num_seqs and the cache allow; admission_capacity() tells a queue consumer how many more
requests of a priority to hand over.

Interactive (priority-0) work beside bulk (priority > 0) work:
- Admitting bulk leaves a reserve of KV blocks free (EngineConfig.priority_reserve), and priority-0 sequences get
  that fraction of max_num_seqs as extra rows on top of it: bulk keeps all max_num_seqs rows (a bulk batch
  runs as wide as offline), and an interactive request beside a full bulk batch still starts at once, without a
  preemption. Each class alone holds at most max_num_seqs rows, so an engine with no bulk work (the offline
  LLM) never runs more than max_num_seqs sequences.
- While priority-0 rows sit on top of a full bulk batch, as many bulk decodes sit each step out, round-robin, so
  the step keeps max_num_seqs rows: a few rows past a round batch cost a whole tile row of every matmul
  (_displaced_decodes).
- The step that starts a waiting priority-0 request carries no bulk prompt chunks (_held_back_priority).
- While priority-0 requests keep arriving (one within interactive_window_s), a step carries at most
  interactive_prefill_tokens bulk prompt tokens: steps stay short, so a new interactive request never waits
  behind a long bulk prefill step (with async scheduling it waits for the step in flight and the one queued
  behind it before its own).
- Meanwhile, by default (interactive_split_steps), bulk prompt chunks and bulk decodes take turns instead of
  sharing steps, and the step that starts an interactive request carries no bulk work at all
  (_split_step_kind).
"""
from __future__ import annotations

import bisect
import time
from collections.abc import Callable

from spool.engine.block_manager import BlockManager
from spool.engine.config import priority_rows
from spool.engine.sequence import Sequence, SeqStatus
from spool.engine.step_types import RunnerOutput, ScheduledChunk, SchedulerOutput


def _priority_of(seq: Sequence) -> int:
    """Bisection key: the queues are sorted by (priority, arrival), so priority alone is sorted too."""
    return seq.priority


class Scheduler:
    """Iteration-level batching over a BlockManager; owns the waiting and running queues."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: list[int],
        priority_reserve: float = 0.0,
        interactive_prefill_tokens: int = 0,
        interactive_window_s: float = 0.0,
        interactive_split_steps: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.block_manager = block_manager
        # What admitting work of priority > 0 must leave free for priority-0 work: KV blocks; and the rows
        # priority-0 work may add beyond max_num_seqs beside it (EngineConfig.max_running_seqs sizes graphs so).
        self.reserved_blocks = int(block_manager.num_blocks * priority_reserve)
        self.reserved_seqs = priority_rows(max_num_seqs, priority_reserve)
        self.max_num_seqs = max_num_seqs
        self.max_rows = max_num_seqs + self.reserved_seqs  # running sequences of all priorities together
        # Bulk prompt tokens per step while interactive requests keep arriving (0: no cap), and how long after
        # the last priority-0 arrival the cap holds.
        self.interactive_prefill_tokens = interactive_prefill_tokens
        self.interactive_window_s = interactive_window_s
        self.clock = clock
        self._best_arrived_at = float("-inf")  # clock() when the last priority-0 sequence was added
        # While the cap holds: bulk prompt steps and bulk decode steps take turns (_split_step_kind).
        self.interactive_split_steps = interactive_split_steps
        self._last_was_prompt_step = False
        self._displace_cursor = 0  # where the next round-robin pick of displaced bulk decodes starts
        self._worse_prompt_left = False  # the last step that could carry bulk prompts left one half-computed
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key; the tail is the first to be preempted
        self.seqs: dict[str, Sequence] = {}
        self._finished_since_step: list[str] = []
        self.num_preemptions = 0
        self.isolated: list[Sequence] = []  # unfinished isolated sequences, oldest first
        self.num_running_history = 0  # running sequences whose sampling reads their outputs on the host
        # Swap (spool/engine/swap.py): host capacity in KV blocks, what is free of it, and this step's copy lists.
        self.host_blocks = self.host_blocks_free = 0
        self.swap_min_tokens = 0
        self.num_swapped_out = 0
        self._host_blocks_to_release = 0  # swapped in by the last step: their host copies are read by then
        self._swap_out: list[tuple[str, list[int]]] = []
        self._swap_in: list[tuple[str, list[int]]] = []

    def enable_swap(self, host_blocks: int, min_tokens: int) -> None:
        """Preempt sequences with >= min_tokens computed tokens by swapping their KV to host_blocks of host memory."""
        self.host_blocks = self.host_blocks_free = host_blocks
        self.swap_min_tokens = min_tokens

    # -- queue management -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.seqs[seq.seq_id] = seq
        seq.max_num_tokens = min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_model_len)
        if seq.priority <= 0:
            self._best_arrived_at = self.clock()
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        if seq.isolated:
            self.isolated.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stop, length, abort): free its blocks and drop it from the queues."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self._stop_running(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq.seq_id)
        self.host_blocks_free += seq.swapped_blocks  # its host copy is dropped at the next launch
        seq.swapped_tokens = seq.swapped_blocks = 0
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        del self.seqs[seq.seq_id]
        self._finished_since_step.append(seq.seq_id)
        if seq.isolated:
            self.isolated.remove(seq)

    def needs_sync(self) -> bool:
        """True when the next step must be scheduled only after the previous one is applied (async scheduling
        falls back to a synchronous step): an isolated request is about to run alone (a crash in its step
        must be its own)."""
        return bool(self.isolated)

    def needs_history(self) -> bool:
        """True when the next step's sampling reads host-side output history (grammar masks, penalties,
        min_tokens) of a running sequence: async scheduling then queues the step's forward pass, applies the
        previous step, and only then samples (spool/engine/async_step.py)."""
        return self.num_running_history > 0

    def _start_running(self, seq: Sequence, num_cached: int) -> None:
        seq.status = SeqStatus.RUNNING
        seq.num_computed_tokens = num_cached
        if seq.num_cached_tokens < 0:  # usage.cached_tokens reports the first admission's hit
            seq.num_cached_tokens = num_cached
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)
        self.num_running_history += seq.needs_host_history
        if seq.swapped_blocks:  # its KV comes back from host memory into the head of its new table
            self._swap_in.append((seq.seq_id, self.block_manager.block_table(seq.seq_id)[: seq.swapped_blocks]))
            self._host_blocks_to_release += seq.swapped_blocks
            seq.swapped_tokens = seq.swapped_blocks = 0

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.num_running_history -= seq.needs_host_history

    def has_unfinished(self) -> bool:
        """True while any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def admission_capacity(self, priority: int) -> int:
        """How many new requests of `priority` a queue consumer should hand over now.

        Free rows of its class (priority 0, or all worse priorities together: max_num_seqs each, max_rows in
        all), plus rows held by lower-priority sequences (schedule() preempts those for such a request),
        while nothing of this priority or better is stuck waiting for KV blocks. So the backlog stays in the
        queue, not in the process, yet an interactive request never waits in Redis behind a full batch of
        bulk ones.
        """
        # Both queues are sorted by (priority, arrival): split them by priority with a bisection, not a scan
        # (the worker asks before every launch, with hundreds of sequences running).
        better_running = bisect.bisect_right(self.running, priority, key=_priority_of)
        yielding = len(self.running) - better_running
        num_ahead = bisect.bisect_right(self.waiting, priority, key=_priority_of)
        ahead = self.waiting[:num_ahead]
        reserved = priority > 0
        if reserved:  # its class: everything of priority 1..priority (priority-0 work holds the extra rows)
            best = self._num_best(self.running) + self._num_best(self.waiting)
            slots = min(self.max_num_seqs - (better_running + num_ahead - best),
                        self.max_rows - better_running - num_ahead)
        else:
            slots = self.max_num_seqs - better_running - num_ahead
        if slots <= 0:
            return 0
        bm = self.block_manager
        bs = bm.block_size
        waiting_blocks = sum(-(-s.num_tokens // bs) for s in ahead)
        free = bm.num_free_blocks - (self.reserved_blocks if reserved else 0)
        if waiting_blocks >= free and yielding:  # count the yielding sequences' blocks only when they matter
            free += sum(bm.num_blocks_held(s.seq_id) for s in self.running[better_running:])
        return slots if waiting_blocks < free else 0

    def _preempt(self, seq: Sequence) -> None:
        self._stop_running(seq)
        computed = seq.num_computed_tokens
        blocks = -(-computed // self.block_manager.block_size)
        if self.host_blocks and computed >= self.swap_min_tokens and blocks <= self.host_blocks_free:
            # Swap rather than recompute: the copy-out runs before this step reuses the freed blocks.
            self._swap_out.append((seq.seq_id, self.block_manager.block_table(seq.seq_id)[:blocks]))
            self.host_blocks_free -= blocks
            seq.swapped_tokens, seq.swapped_blocks = computed, blocks
            self.num_swapped_out += 1
        self.block_manager.free(seq.seq_id)
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        seq.generation += 1  # chunks of steps still in flight no longer describe its (freed) KV
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    @staticmethod
    def _num_best(queue: list[Sequence]) -> int:
        """Sequences of priority <= 0 at the head of a priority-sorted queue."""
        return bisect.bisect_right(queue, 0, key=_priority_of)

    def _class_full(self, seq: Sequence) -> bool:
        """seq's class (priority <= 0, or worse) already runs max_num_seqs sequences."""
        best = self._num_best(self.running)
        return (best if seq.priority <= 0 else len(self.running) - best) >= self.max_num_seqs

    def _has_row(self, seq: Sequence) -> bool:
        """seq may start now: a row is free in all (max_rows) and in its class (max_num_seqs)."""
        return len(self.running) < self.max_rows and not self._class_full(seq)

    def _reserve(self, seq: Sequence) -> int:
        """Blocks that admitting seq must leave free (running sequences still grow into them)."""
        return self.reserved_blocks if seq.priority > 0 else 0

    def _first_chunk(self, seq: Sequence, budget: int) -> tuple[list[int], int, int]:
        """Prefix-cache hit and first chunk size for a waiting sequence: (cached blocks, cached tokens, new tokens).

        A swapped-out sequence's KV comes back from host memory instead: it resumes after its computed tokens.
        """
        if seq.swapped_blocks:
            return [], seq.swapped_tokens, min(seq.num_tokens - seq.swapped_tokens, budget)
        blocks, num_cached = self.block_manager.get_computed_blocks(seq.token_ids)
        return blocks, num_cached, min(seq.num_tokens - num_cached, budget)

    def _make_room_for_priority(self) -> None:
        """Preempt lower-priority running sequences while a better-priority waiting one cannot start."""
        while self.waiting and self.running:
            head, tail = self.waiting[0], self.running[-1]
            if head.priority >= tail.priority or head.num_pending_tokens:
                return
            if head.priority <= 0 and self._class_full(head):
                return  # priority-0 work fills max_num_seqs: preempting worse work would free no row for it
            blocks, cached, new = self._first_chunk(head, self.max_num_batched_tokens)
            if self._has_row(head) and self.block_manager.can_allocate(head.seq_id, cached + new, blocks,
                                                                        self._reserve(head)):
                return
            self._preempt(tail)

    def _held_back_priority(self) -> int | None:
        """Priority whose worse prompt chunks sit out this step, or None.

        When a request of better priority than some running one is waiting (an interactive job beside a bulk
        batch), the step that starts it carries no prompt tokens of worse priority: only its prompt and every
        running decode. Otherwise running bulk prompts (chunked prefill) could take the whole token budget
        step after step, and even when they leave room, a step with thousands of their prompt tokens takes
        hundreds of milliseconds on a GPU, which all lands on the interactive request's first token. Held-back
        prompt tokens run in the next step: no work is lost, at most one step is added.
        """
        if not self.waiting or not self.running or self.waiting[0].priority >= self.running[-1].priority:
            return None
        return self.waiting[0].priority

    def _worse_prompt_budget(self) -> int:
        """Prompt tokens of priority > 0 this step may carry: interactive_prefill_tokens while priority-0
        requests keep arriving beside worse work, else the whole step budget.

        With async scheduling a new interactive request waits for the step in flight and the one already
        queued behind it, then its own step (which carries no worse prompt chunks: _held_back_priority). At
        8,192 tokens a bulk prefill step takes ~200 ms on an H200 with llama3-8b, so those two steps put
        ~400 ms under the request's first token; capped at 2,048 prompt tokens they take ~70 ms (split from the
        decodes at 4,096: _split_step_kind, ~100 ms and ~25 ms). The cap holds for interactive_window_s after each
        priority-0 arrival, so the steps are already short when the next one comes; it costs more, shorter
        bulk prefill steps.
        """
        cap = self.interactive_prefill_tokens
        if cap <= 0 or self.clock() - self._best_arrived_at >= self.interactive_window_s:
            return self.max_num_batched_tokens
        return cap

    def _split_step_kind(self, held_back: int | None, worse_prompt: int) -> tuple[bool, bool]:
        """(no worse prompt chunks, no worse decodes) for this step while the interactive cap holds.

        Written when a decode row in a step with prompt chunks ran through the prefill attention tiles (32 query
        slots for its one query) at ~2x its decode-only cost (~80 vs ~34 ns per context token on an H200,
        spool/testing/timed_runner.py StepCost), so the cap's many short mixed steps cost bulk ~10%; the kernel
        now runs such rows with decode tiles (spool/kernels/paged_attention.py). It is on by default for its shorter
        TTFT on an H200 at the same bulk ratio (EngineConfig.interactive_split_steps). With it, while the cap holds, a
        step carries worse-priority prompt chunks or worse-priority decodes, in turns (decode steps replay CUDA
        graphs); priority-0 work joins either. The step that starts a waiting priority-0 request (held_back 0)
        carries neither, when that request can start: it is short, and its first token is the next thing the
        device computes. Outside the cap (no interactive traffic, offline) steps mix as before.

        Beside a narrow bulk batch the extra decode steps' fixed cost about cancels the rows' saved attention
        (bench/schedule_sim.py, cap 2,048, a probe per 500 ms: bulk time +1.0% / -0.1% / -1.2% / -6.1% against
        mixed steps at 128 / 192 / 256 / 512 bulk requests; +2.8% at 128 with a probe per 200 ms, where TTFT
        p90 halved, 37 vs 71 ms). A floor on the bulk rows for splitting (tried: 160) put mixed steps back at
        the start of every batch, and with them TTFT p90 at cap 4,096 from ~107 to ~188 ms.
        """
        if not self.interactive_split_steps or worse_prompt >= self.max_num_batched_tokens:
            return False, False
        if held_back is not None and held_back <= 0:
            head = self.waiting[0]
            if self._has_row(head) and self.block_manager.can_allocate(
                    head.seq_id, min(head.num_tokens, self.max_num_batched_tokens), None, self._reserve(head)):
                self._last_was_prompt_step = True  # worse decodes sat out: they go next
                return True, True
            return True, False
        prompts, decodes = self._worse_prompt_work(), self._worse_decodes_running()
        if prompts and (not decodes or not self._last_was_prompt_step):
            self._last_was_prompt_step = True
            return False, True
        self._last_was_prompt_step = False
        return True, False

    def _displaced_decodes(self) -> frozenset[int] | tuple[()]:
        """Indices into running of the worse-priority decodes that sit this step out, so that priority-0 rows on
        top of a full bulk batch keep the step at max_num_seqs rows.

        A decode step's matmuls take its rows as M, and cuBLAS's tiles make a few rows past a round batch cost a
        whole tile row: on an H200, llama3-8b decode steps took 18.05 ms at 512 rows and 19.26 ms at 513 (the
        528-row graph), +6.7%; bench/gemm_rows.py puts the GEMMs at +12.5%, and fp8 W8A8 ones at +47% (bench/RESULTS.md,
        twelfth session). An interactive request decoding beside 512 bulk rows paid that on every step. So while
        priority-0 work holds `over` rows beyond max_num_seqs, `over` bulk decodes sit out each step, picked
        round-robin over the bulk rows (each waits one step in every n_bulk / over). Bulk then loses over / n_bulk
        of its rows instead of the padded step's time; past 1/16 (a narrow bulk batch beside many priority-0
        rows) that trade stops paying, and none sit out.
        """
        over = len(self.running) - self.max_num_seqs
        if over <= 0:
            return ()
        best = self._num_best(self.running)
        worse = len(self.running) - best
        if over * 16 > worse:
            return ()
        picked: list[int] = []
        start = self._displace_cursor % worse
        j = 0
        for j in range(worse):
            k = best + (start + j) % worse
            seq = self.running[k]
            scheduled = len(seq.token_ids) + seq.num_pending_tokens
            if scheduled - seq.num_computed_tokens == 1 and not (seq.num_pending_tokens and
                                                                   scheduled >= seq.max_num_tokens):
                picked.append(k)
                if len(picked) == over:
                    break
        self._displace_cursor = start + j + 1
        return frozenset(picked)

    def _worse_prompt_work(self) -> bool:
        """A worse-priority prompt chunk could run now: one left half-computed, or a waiting one that fits."""
        if self._worse_prompt_left:
            return True
        if not self.waiting or self.waiting[-1].priority <= 0:
            return False
        seq = self.waiting[self._num_best(self.waiting)]  # the next one to start
        return not self._class_full(seq) and self.block_manager.can_allocate(
            seq.seq_id, min(seq.num_tokens, self.interactive_prefill_tokens), None, self._reserve(seq))

    def _worse_decodes_running(self) -> bool:
        """The oldest running worse-priority sequence is past its prompt (then it, at least, decodes)."""
        best = self._num_best(self.running)
        if best == len(self.running):
            return False
        seq = self.running[best]
        return seq.num_computed_tokens >= seq.num_prompt_tokens

    # -- the step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks; mutates block tables and num_computed_tokens, never half-way."""
        out = SchedulerOutput(finished_seq_ids=self._finished_since_step)
        self._finished_since_step = []
        self.host_blocks_free += self._host_blocks_to_release
        self._host_blocks_to_release = 0
        out.swap_out, out.swap_in = self._swap_out, self._swap_in = [], []
        if self.isolated:
            return self._schedule_isolated(out)
        self._make_room_for_priority()
        budget = self.max_num_batched_tokens
        held_back = self._held_back_priority()
        worse_prompt = self._worse_prompt_budget()  # prompt tokens of priority > 0 left for this step
        no_worse_prompts, no_worse_decodes = self._split_step_kind(held_back, worse_prompt)
        if no_worse_prompts:
            worse_prompt = 0
        worse_prompt_left = False  # a worse-priority prompt stays half-computed after this step
        track_left = self.interactive_split_steps  # only split steps read worse_prompt_left
        displaced = () if no_worse_decodes else self._displaced_decodes()
        allocate, emit = self.block_manager.allocate, self._emit  # per running sequence: no attribute chains
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            scheduled_tokens = len(seq.token_ids) + seq.num_pending_tokens
            if seq.num_pending_tokens and scheduled_tokens >= seq.max_num_tokens:
                i += 1  # its token still on the device reaches max_tokens / max_model_len: nothing follows it
                continue
            num_new = min(scheduled_tokens - seq.num_computed_tokens, budget)
            if num_new > 1 and held_back is not None and seq.priority > held_back:
                i += 1  # a worse-priority prompt chunk sits this step out (decodes too when split: below)
                continue
            if num_new == 1 and no_worse_decodes and seq.priority > 0:
                i += 1  # a bulk decode sits out a prompt step (or an interactive request's first step)
                continue
            if displaced and i in displaced:
                i += 1  # a bulk decode lends its row to a priority-0 row beyond max_num_seqs (_displaced_decodes)
                continue
            if num_new > 1 and seq.priority > 0:
                num_new = min(num_new, worse_prompt)
                if num_new <= 0:
                    i += 1  # the capped bulk prompt budget is spent: its next chunk waits a step
                    continue
                worse_prompt -= num_new
            scheduled = True
            while not allocate(seq.seq_id, seq.num_computed_tokens + num_new, seq.token_ids):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            emit(out, seq, num_new)
            if track_left:
                worse_prompt_left |= seq.priority > 0 and seq.num_computed_tokens < seq.num_prompt_tokens
            budget -= num_new
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_rows:
            seq = self.waiting[0]
            if held_back is not None and seq.priority > held_back:
                break
            if seq.num_pending_tokens:
                break  # preempted while its last token was on the device: it restarts once that token is in
            if self._class_full(seq):
                break  # its class runs max_num_seqs sequences (the rows beyond are priority-0 work's)
            seq_budget = budget if seq.priority <= 0 else min(budget, worse_prompt)
            if seq_budget <= 0:
                break  # the capped bulk prompt budget is spent
            blocks, num_cached, num_new = self._first_chunk(seq, seq_budget)
            if not self.block_manager.allocate(seq.seq_id, num_cached + num_new, seq.token_ids, blocks,
                                               self._reserve(seq)):
                break
            if seq.priority > 0:
                worse_prompt -= num_new
            self.waiting.pop(0)
            self._start_running(seq, num_cached)
            self._emit(out, seq, num_new)
            worse_prompt_left |= seq.priority > 0 and seq.num_computed_tokens < seq.num_prompt_tokens
            budget -= num_new
        if not no_worse_prompts:
            self._worse_prompt_left = worse_prompt_left
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _schedule_isolated(self, out: SchedulerOutput) -> SchedulerOutput:
        """A step of the oldest isolated request's sequences only; everything else keeps its KV and waits.

        Slots and blocks for them are made by preempting the newest lowest-priority other sequences, as for
        any admission; if the whole cache cannot hold them, they wait like any sequence that does not fit.
        """
        request_id = self.isolated[0].request_id
        group = [s for s in self.isolated if s.request_id == request_id]
        budget = self.max_num_batched_tokens
        for i, seq in enumerate(group):
            if budget <= 0:
                break
            later = group[i + 1:]  # not scheduled yet this step: may give way to `seq`
            if seq.status is SeqStatus.WAITING:
                while len(self.running) >= self.max_num_seqs and self._preempt_other(group, later):
                    pass
                if len(self.running) >= self.max_num_seqs:
                    continue
                blocks, num_cached, num_new = self._first_chunk(seq, budget)
                while not self.block_manager.allocate(seq.seq_id, num_cached + num_new, seq.token_ids, blocks):
                    if not self._preempt_other(group, later):
                        break
                    blocks, num_cached, num_new = self._first_chunk(seq, budget)  # preemption may free hits
                else:
                    self.waiting.remove(seq)
                    self._start_running(seq, num_cached)
                    self._emit(out, seq, num_new)
                    budget -= num_new
                continue
            num_new = min(seq.num_scheduled_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq.seq_id, seq.num_computed_tokens + num_new, seq.token_ids):
                if not self._preempt_other(group, later):
                    break
            else:
                self._emit(out, seq, num_new)
                budget -= num_new
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _preempt_other(self, group: list[Sequence], later: list[Sequence]) -> bool:
        """Make room for an isolated sequence: preempt the newest running sequence of another request, else a
        running sibling not yet scheduled this step; False if there is none."""
        members = {id(s) for s in group}
        victim = next((s for s in reversed(self.running) if id(s) not in members), None)
        if victim is None:
            victim = next((s for s in reversed(later) if s.status is SeqStatus.RUNNING), None)
        if victim is None:
            return False
        self._preempt(victim)
        return True

    def _emit(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        """Schedule seq's next num_new tokens: a chunk in `out`, and seq's progress moved past them."""
        start = seq.num_computed_tokens
        end = seq.num_computed_tokens = start + num_new
        token_ids, seq_id, pending = seq.token_ids, seq.seq_id, seq.num_pending_tokens
        tokens = token_ids[start:end]
        chunks = out.chunks
        if len(tokens) < num_new:
            # Async scheduling: the last token was sampled by the step still in flight. A placeholder holds its
            # place; the runner copies the real id from that step's sampled-token tensor on the device.
            tokens.append(0)
            out.device_input_rows.append(len(chunks))
        sample = end == len(token_ids) + pending
        # Fields in declaration order: keyword arguments would cost ~0.2 µs more per sequence and step.
        chunks.append(ScheduledChunk(
            seq_id, tokens, start, self.block_manager.block_table_array(seq_id),
            sample, seq.params, seq.prompt_token_ids, token_ids, seq.seed, seq.grammar,
        ))
        out.seqs.append(seq)
        out.generations.append(seq.generation)
        seq.num_pending_tokens = pending + sample  # back to 0 when update_from_output applies this step

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[Sequence]:
        """Append sampled tokens, apply token-level stop rules; returns the sequences that got a token."""
        updated: list[Sequence] = []
        advancing: list[tuple[Sequence, int]] = []  # structured-output sequences and their new token
        sampled = result.sampled
        bs = self.block_manager.block_size
        finished, running, eos = SeqStatus.FINISHED, SeqStatus.RUNNING, self.eos_token_ids
        for chunk, seq, generation in zip(sched.chunks, sched.seqs, sched.generations):
            token = None
            if chunk.sample:
                seq.num_pending_tokens -= 1
                token = sampled.get(chunk.seq_id)
            if seq.status is finished:
                # Aborted or stopped while the step ran (async scheduling: stopped by the step before it). Its
                # token is dropped; the KV slot it wrote belonged to blocks already freed, never hashed.
                continue
            token_ids = seq.token_ids
            if token is not None:
                # Also for a sequence preempted since this step was launched (async scheduling): the token is
                # real, and the recompute covers it as it covers the rest of the sequence.
                token_ids.append(token)
                updated.append(seq)
            # Blocks that just became full of tokens this step computed can now serve later prompts (only while
            # the sequence still holds the blocks this step wrote). Earlier blocks were registered when they
            # filled, so a chunk that fills none has nothing to register.
            start = chunk.start_pos
            end = start + len(chunk.token_ids)
            if end // bs > start // bs and generation == seq.generation and seq.status is running:
                self.block_manager.cache_blocks(seq.seq_id, token_ids, end)
            if token is not None:
                # _check_token_stop can only end the sequence on an EOS or stop id, or at its length limit
                # (max_num_tokens: prompt + max_tokens, within max_model_len): skip the call otherwise.
                if token in eos or len(token_ids) >= seq.max_num_tokens or token in seq.params.stop_token_ids:
                    self._check_token_stop(seq, token)
                # Still unfinished: running, or preempted since this step was launched (async scheduling);
                # either way the matcher must have accepted every output token.
                if seq.grammar is not None and seq.status is not finished:
                    advancing.append((seq, token))
        if advancing:
            self._advance_grammars(advancing)
        return updated

    def _advance_grammars(self, advancing: list[tuple[Sequence, int]]) -> None:
        """Feed structured-output sequences their new tokens (one batched call); a terminated grammar ends one.

        Only unfinished sequences get here: once stopped (EOS, stop id, length) the matcher is never asked
        for a mask again. The grammar terminates only by accepting an EOS that did not stop the
        sequence (ignore_eos, or an EOS allowed before min_tokens because the grammar allowed nothing else):
        then nothing may follow, so the sequence stops.
        """
        grammars = [seq.grammar for seq, _ in advancing]
        kind = type(grammars[0])
        accept_many = getattr(kind, "accept_many", None)
        if accept_many is not None and all(type(g) is kind for g in grammars):
            accepted = accept_many(grammars, [token for _, token in advancing])
        else:
            accepted = [g.accept(token) for g, (_, token) in zip(grammars, advancing)]
        # A matcher terminates only by accepting one of its stop tokens, which are the engine's EOS ids
        # (LLMEngine gives the grammar compiler these): only those rows need asking.
        eos = self.eos_token_ids
        for (seq, token), ok in zip(advancing, accepted):
            if not ok:
                self.finish(seq, "error")  # the mask allowed it, so this is a bug: end it rather than emit junk
            elif token in eos and seq.grammar.terminated:
                self.finish(seq, "stop")

    def _check_token_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                self.finish(seq, "stop")
                return
            if token in p.stop_token_ids:
                self.finish(seq, "stop", token)
                return
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self.finish(seq, "length")
