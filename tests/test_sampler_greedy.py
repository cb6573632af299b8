"""Sampler.launch_greedy (the runner's path when every row is a bare argmax) and is_plain_greedy."""
from __future__ import annotations

import pytest
import torch

from spool.engine.model_runner import _all_plain_greedy
from spool.engine.sampler import Sampler, SamplingRow, is_plain_greedy
from spool.engine.sampling_params import SamplingParams
from spool.engine.step_types import ScheduledChunk

V = 64


def test_launch_greedy_equals_launch_with_rows():
    logits = torch.randn(5, V + 3, generator=torch.Generator().manual_seed(0))  # lm_head padding columns
    logits[:, V:] = 100.0  # padding is never picked
    sampler = Sampler(V, "cpu")
    p = SamplingParams(temperature=0.0)
    rows = [SamplingRow(p, [1], [], None, [V - 1], f"s{i}") for i in range(5)]
    got, want = sampler.launch_greedy(logits), sampler.launch(logits, rows)
    assert got.result() == want.result()
    assert torch.equal(got.tokens, want.tokens) and got.result().token_ids == logits[:, :V].argmax(-1).tolist()
    with pytest.raises(ValueError):
        sampler.launch_greedy(torch.zeros(2, V - 1))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.0, logprobs=0),
                                dict(temperature=0.0, logit_bias={3: 1.0}), dict(temperature=0.0, min_tokens=1),
                                dict(temperature=0.0, repetition_penalty=1.1),
                                dict(temperature=0.0, frequency_penalty=0.5),
                                dict(temperature=0.0, presence_penalty=0.5)])
def test_anything_beyond_argmax_is_not_plain(kw):
    assert not is_plain_greedy(SamplingParams(**kw))
    assert is_plain_greedy(SamplingParams(temperature=0.0, stop=["x"], max_tokens=3, ignore_eos=True))
    assert is_plain_greedy(SamplingParams(temperature=0.7, top_p=0.0))  # only the top token is left


def _chunk(params, grammar=None, sample=True):
    return ScheduledChunk("s", [1], 0, None, sample, params, [1], [1], None, grammar)


def test_a_grammar_or_one_sampled_row_takes_the_general_path():
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)
    chunks = [_chunk(greedy), _chunk(greedy), _chunk(sampled, sample=False)]
    assert _all_plain_greedy(chunks, [0, 1])  # the unsampled chunk's params do not matter
    assert not _all_plain_greedy(chunks, [0, 1, 2])
    assert not _all_plain_greedy([_chunk(greedy), _chunk(greedy, grammar=object())], [0, 1])
