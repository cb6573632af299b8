"""GPU tier (`pytest -m gpu`): the engine on CUDA with Triton kernels and CUDA graphs."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(rng.choice([1, 5, 17, 40, 90]))] for _ in range(n)]


@requires_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("eager", [True, False])
def test_fp32_cuda_greedy_matches_transformers(model_factory, arch, eager):
    from spool.engine import LLM, SamplingParams
    from tests.hf_reference import hf_greedy

    path = model_factory(arch, tie=arch == "qwen2")
    llm = LLM(str(path), device="cuda", dtype="float32", block_size=16, max_num_seqs=8, enforce_eager=eager,
              max_num_batched_tokens=64, num_kv_blocks=256)
    assert llm.engine.runner.ops.name == "triton"
    assert (llm.engine.runner.graphs is None) == eager
    assert (llm.engine.runner.piecewise is None) == eager  # host-bound at any size: steps with prompts replay too
    prompts = _prompts(8, seed=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(path, p, 12)


@requires_cuda
def test_prefix_caching_same_output_on_gpu(tiny_llama):
    from spool.engine import LLM, SamplingParams

    shared = _prompts(1, 9)[0] * 3
    prompts = [{"prompt_token_ids": shared + q} for q in _prompts(6, 10)]
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = []
    for caching in (False, True):
        llm = LLM(str(tiny_llama), device="cuda", dtype="float32", enable_prefix_caching=caching, max_num_seqs=2,
                  num_kv_blocks=128)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, p)])
    assert outs[0] == outs[1]


@requires_cuda
def test_llama3_8b_shape_bf16_logits_as_accurate_as_transformers():
    """Same random weights: spool's bf16 logits are as close to the fp32 truth as transformers' bf16 logits.

    The issue asked for <= 2e-2 relative error against transformers' bf16 logits. On random llama3-8b-shape
    weights that bound is out of reach for any pair of bf16 implementations: transformers' own bf16 logits are
    ~7% from its fp32 logits (bench/diag_logits.py, bench/RESULTS.md), and the rounding of two implementations
    is independent. So the reference here is transformers in fp32, and spool must be no less accurate than
    transformers in bf16 (within 10%).
    """
    from bench.diag_logits import hf_reference, rel, spool_logits
    from bench.shapes import shape_dir

    path = shape_dir("llama3-8b")
    ids = _prompts(1, 4)[0] + list(range(1000, 1200))
    hf, ref16, ref32 = hf_reference(path, ids)
    ours = spool_logits(path, hf, ids)
    ours_err, hf_err = rel(ours, ref32), rel(ref16, ref32)
    assert ours_err <= 1.1 * hf_err + 1e-3, (ours_err, hf_err)
    assert rel(ours, ref16) < 3 * hf_err, rel(ours, ref16)


@requires_cuda
@pytest.mark.parametrize("eager", [True, False])
def test_async_scheduling_on_cuda_equals_sync(tiny_llama, eager):
    """Async scheduling on CUDA (tokens fed on the device, graphs replayed with double-buffered inputs): same
    outputs as synchronous stepping, with stops, seeds, logprobs and preemption on a tight cache."""
    from spool.engine import LLM, SamplingParams

    prompts = [{"prompt_token_ids": p} for p in _prompts(12, seed=21)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    params = [greedy, greedy.model_copy(update={"logprobs": 2}), SamplingParams(temperature=0, max_tokens=24),
              SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=16)] * 3
    outs = {}
    for mode in (False, True):
        llm = LLM(str(tiny_llama), device="cuda", dtype="float32", block_size=16, max_num_seqs=8, enforce_eager=eager,
                  num_kv_blocks=24, async_scheduling=mode)
        assert llm.engine.async_scheduling is mode
        res = llm.generate(prompts, params)
        outs[mode] = [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in res]
        assert llm.engine.block_manager.num_used_blocks == 0
    assert outs[True] == outs[False]
