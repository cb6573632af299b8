"""GPU tier (`pytest -m gpu`): the engine with an fp8 KV cache on CUDA, CUDA graphs included."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu
requires_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs a CUDA GPU with FP8"
)


def _prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(10, 500) for _ in range(rng.choice([1, 5, 17, 40, 90]))]}
            for _ in range(n)]


def _greedy(llm, prompts, n=12):
    from spool.engine import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@requires_fp8_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [16, 64])  # 64: the engine's default page
def test_fp8_kv_cuda_graphs_match_eager(tiny_llama, dtype, block_size):
    """Decode steps replayed from CUDA graphs over an fp8 cache give the eager path's tokens, with scales != 1."""
    from spool.engine import LLM

    prompts = _prompts(8, seed=5)
    outs = []
    for eager in (True, False):
        llm = LLM(str(tiny_llama), device="cuda", dtype=dtype, kv_cache_dtype="fp8", block_size=block_size,
                  max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=256, enforce_eager=eager)
        runner = llm.engine.runner
        assert runner.kv_caches[0][0].dtype == torch.float8_e4m3fn and (runner.graphs is None) == eager
        for layer in runner.model.layers:  # non-trivial scales: the captured graphs must carry them
            layer.self_attn.k_scale, layer.self_attn.v_scale = 0.05, 0.03
        if not eager:
            assert runner.piecewise is not None
            runner.capture_graphs()  # recapture, decode and piecewise graphs, with the scales set above
        outs.append(_greedy(llm, prompts))
    assert outs[0] == outs[1]


@requires_fp8_gpu
@pytest.mark.parametrize("block_size", [16, 64])
def test_fp8_kv_triton_matches_torch_backend_on_cuda(tiny_llama, block_size):
    """Triton fp8 kernels vs the torch reference backend, both on CUDA in fp32: same greedy tokens."""
    from spool.engine import LLM

    prompts = _prompts(8, seed=6)
    runs = [_greedy(LLM(str(tiny_llama), device="cuda", dtype="float32", kv_cache_dtype="fp8", kernel_backend=b,
                        block_size=block_size, max_num_seqs=8, num_kv_blocks=256, enforce_eager=True), prompts)
            for b in ("triton", "torch")]
    assert runs[0] == runs[1]

