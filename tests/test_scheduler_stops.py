"""Scheduler.update_from_output's token stop rules (EOS, stop ids, min_tokens, max_tokens, max_model_len) against
a reference written from the rules, over random token streams (the update skips the rule check for tokens
that cannot stop a sequence)."""
from __future__ import annotations

import random

from spool.engine.block_manager import BlockManager
from spool.engine.sampling_params import SamplingParams
from spool.engine.scheduler import Scheduler
from spool.engine.sequence import Sequence
from spool.engine.step_types import RunnerOutput

EOS = 2
MAX_MODEL_LEN = 40


def _expected(prompt_len: int, out: list[int], p: SamplingParams) -> tuple[str, int | None] | None:
    """(finish_reason, stop_reason) after these output tokens, or None while it runs."""
    n, token = len(out), out[-1]
    if n >= p.min_tokens:
        if not p.ignore_eos and token == EOS:
            return "stop", None
        if token in p.stop_token_ids:
            return "stop", token
    if n >= p.max_tokens or prompt_len + n >= MAX_MODEL_LEN:
        return "length", None
    return None


def test_stop_rules_match_the_reference():
    rng = random.Random(3)
    for trial in range(40):
        sched = Scheduler(BlockManager(400, 4), 8, 256, MAX_MODEL_LEN, [EOS])
        seqs = {}
        for i in range(8):
            max_tokens = rng.randint(1, 30)
            p = SamplingParams(max_tokens=max_tokens, min_tokens=min(rng.choice([0, 0, 2]), max_tokens),
                               ignore_eos=rng.random() < 0.3, stop_token_ids=rng.choice([[], [5], [5, EOS]]))
            prompt = [rng.randrange(3, 9) for _ in range(rng.randint(1, 20))]
            seq = Sequence(f"s{i}", f"r{i}", 0, prompt, p, None, 0, i)
            sched.add(seq)
            seqs[seq.seq_id] = seq
        while sched.has_unfinished():
            out = sched.schedule()
            sampled = {c.seq_id: rng.choice([EOS, 5, 6, 7, 8]) for c in out.chunks if c.sample}
            sched.update_from_output(out, RunnerOutput(sampled=sampled))
            for seq_id in sampled:
                seq = seqs[seq_id]
                outs = seq.token_ids[len(seq.prompt_token_ids):]
                want = _expected(len(seq.prompt_token_ids), outs, seq.params)
                got = (seq.finish_reason, seq.stop_reason) if seq.finished else None
                assert got == want, (trial, seq_id, outs, seq.params)
