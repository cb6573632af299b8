"""The engine equals transformers' greedy output token for token, whatever the batching does."""
from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernel_backend="triton" below: before any @triton.jit compiles
from spool.engine import LLM, SamplingParams  # noqa: E402
from tests.hf_reference import hf_greedy

MAX_NEW = 12


def _prompts(n: int, vocab: int, seed: int, lengths=(1, 3, 7, 16, 17, 33, 60, 95)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def _check(llm: LLM, path, prompts) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.prompt_token_ids for o in outs] == prompts
    for p, o in zip(prompts, outs):
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].token_ids == hf_greedy(path, p, MAX_NEW), f"prompt of {len(p)} tokens diverged"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_matches_transformers(model_factory, arch):
    path = model_factory(arch, tie=arch == "qwen2")
    llm = LLM(str(path), device="cpu", block_size=16, max_num_seqs=8)
    _check(llm, path, _prompts(8, 512, seed=1))


def test_triton_kernels_match_transformers_on_qwen3(model_factory):
    """The Triton backend's path through a Qwen3 layer (q/k norm fused with rotary) on the CPU interpreter, kept
    short: the interpreter takes milliseconds per program."""
    path = model_factory("qwen3")
    llm = LLM(str(path), device="cpu", block_size=16, max_num_seqs=4, kernel_backend="triton")
    prompts = _prompts(2, 512, seed=6, lengths=(5, 19))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(path, p, 4) for p in prompts]


def test_chunked_prefill_matches(tiny_llama):
    # A 24-token budget splits every long prompt into several chunks, mixed with other sequences' decodes.
    llm = LLM(str(tiny_llama), device="cpu", block_size=8, max_num_batched_tokens=24, max_num_seqs=4)
    _check(llm, tiny_llama, _prompts(6, 512, seed=2))


def test_preemption_matches(tiny_llama):
    # 12 blocks of 8 tokens cannot hold all sequences at once: the newest are preempted and recomputed.
    llm = LLM(str(tiny_llama), device="cpu", block_size=8, num_kv_blocks=12, max_num_seqs=8)
    prompts = _prompts(8, 512, seed=3, lengths=(20, 25, 30, 12))
    _check(llm, tiny_llama, prompts)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_used_blocks == 0


def test_prefix_caching_does_not_change_output(tiny_llama):
    shared = _prompts(1, 512, seed=4, lengths=(40,))[0]
    prompts = [shared + tail for tail in _prompts(5, 512, seed=5, lengths=(1, 5, 9))]
    outs = {}
    for caching in (False, True):
        llm = LLM(str(tiny_llama), device="cpu", block_size=8, enable_prefix_caching=caching, max_num_seqs=2)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        outs[caching] = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
        if caching:
            assert llm.engine.block_manager.stats.hits > 0
    assert outs[True] == outs[False]
    assert outs[True][0] == hf_greedy(tiny_llama, prompts[0], MAX_NEW)
