"""Async scheduling: step N+1 is scheduled and launched while step N still runs on the device.

vLLM v1's async scheduling and SGLang's overlap scheduler, in this engine's terms:

- LLMEngine.launch() schedules step N+1 before step N's tokens reach the host. A sequence whose step-N chunk
  samples counts that token as pending (Sequence.num_pending_tokens); its step-N+1 chunk is the decode of
  that token, whose id only the device knows. The chunk carries a placeholder, and the runner copies the id
  from step N's sampled-token tensor into the step's input ids on the device (`device_feed` below).
- LLMEngine.collect() then applies step N's results (append, stop rules, detokenization, deltas) while step
  N+1 computes. So results come out one step later than in synchronous stepping, and stop conditions other
  than length (EOS, stop ids, stop strings, abort) are seen one step late: such a sequence may have one
  extra step whose token is dropped (Scheduler.update_from_output skips finished sequences). Its KV slot is
  in blocks freed when it stopped, and only blocks full of tokens computed before the stop are hashed for
  the prefix cache. Length limits are known ahead, so nothing is scheduled past them.
- Sequences whose sampling reads their output on the host (grammar masks, penalties, min_tokens;
  Scheduler.needs_history) split the launch (vLLM's structured-output overlap): LLMEngine.launch() schedules
  step N+1 and queues its forward pass (ModelRunner.launch_forward), then applies step N on the host
  (waits for its tokens; append, stop rules, grammar accept), starts filling N+1's grammar bitmask on
  xgrammar's threads (ModelRunner.start_grammar_mask, spool/engine/grammar_mask.py), detokenizes step N meanwhile,
  then builds N+1's sampling rows from the advanced matchers and histories and queues the sampling
  (ModelRunner.launch_sampling, which takes the filled bitmask). The device computes forward N+1 while the
  host applies N and fills the bitmask. A sequence that finished at step N (EOS, length, grammar end or
  error) has its N+1 row sampled without a mask and its token dropped, like any one-step-late stop; one
  that a stop string finished (found while detokenizing, after the fill started) keeps its mask, and its
  token is dropped too.
- Isolated requests make the engine step synchronously (Scheduler.needs_sync): the previous step is
  applied before the next one is scheduled. So do history rows on a runner without launch_forward.
- A sequence preempted while its token is pending keeps that token when it arrives (it is real) and is
  re-admitted only after; steps launched before a preemption never register blocks for it
  (Sequence.generation).

Greedy and seeded outputs are token-for-token those of synchronous stepping (tests/test_async_scheduling.py,
tests/test_async_grammar.py).
"""
from __future__ import annotations

from spool.engine.step_types import PendingStep, SchedulerOutput


def device_feed(sched: SchedulerOutput, previous: PendingStep | None) -> tuple[list[int], list[int]]:
    """(chunk indices, rows of the previous step's sampled tensor) for chunks whose last token is on the device."""
    rows = sched.device_input_rows
    if not rows:
        return [], []
    if previous is None or previous.device_tokens is None:
        raise RuntimeError("a chunk's input token is pending but no previous step sampled it")
    row_of = {seq_id: i for i, seq_id in enumerate(previous.seq_ids)}
    chunks = sched.chunks
    return rows, [row_of[chunks[i].seq_id] for i in rows]
