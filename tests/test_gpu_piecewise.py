"""GPU tier (`pytest -m gpu`): piecewise CUDA graphs for steps with prompt tokens (spool/engine/piecewise_graphs.py)."""
from __future__ import annotations

import random

import pytest
import torch

from tests.test_piecewise_graphs import assert_segmented_forward_equal, mixed_steps

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU")


@requires_cuda
def test_weak_view_aliases_without_owning():
    from spool.engine.piecewise_graphs import weak_view

    t = torch.arange(1 << 18, dtype=torch.bfloat16, device="cuda").view(512, 512)[:, :256]
    w = weak_view(t)
    assert w.dtype == t.dtype and w.shape == t.shape and w.stride() == t.stride() and w.data_ptr() == t.data_ptr()
    assert torch.equal(w, t)
    w.fill_(3)
    assert t.eq(3).all()
    ptr = t.data_ptr()
    del t
    again = torch.empty(512, 512, dtype=torch.bfloat16, device="cuda")  # the caching allocator hands it back
    assert again.data_ptr() == ptr


def _llm(path, dtype: str, **kw):
    from spool.engine import LLM

    return LLM(str(path), device="cuda", dtype=dtype, block_size=16, max_num_seqs=16, max_num_batched_tokens=600,
               num_kv_blocks=256, piecewise_graph_tokens=600, **kw)


@requires_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_replayed_segments_equal_the_eager_forward(model_factory, arch, dtype, tol):
    """Steps of many sizes, alternating buckets (which share one memory pool): each replay equals the eager
    forward on the same cache."""
    llm = _llm(model_factory(arch), dtype)
    runner = llm.engine.runner
    pw = runner.piecewise
    assert pw is not None and pw.graphs and pw.sizes == [64, 128, 256, 512, 600]
    steps = list(mixed_steps(random.Random(7), runner.block_size, runner.num_blocks, scale=4)) * 2
    random.Random(8).shuffle(steps)
    seen = assert_segmented_forward_equal(runner, pw, steps, tol)
    assert len(seen) >= 3


@requires_fp8
def test_replayed_segments_with_fp8_weights_and_kv(tiny_llama):
    llm = _llm(tiny_llama, "bfloat16", quantization="fp8", kv_cache_dtype="fp8")
    runner = llm.engine.runner
    steps = list(mixed_steps(random.Random(9), runner.block_size, runner.num_blocks, scale=4))
    assert_segmented_forward_equal(runner, runner.piecewise, steps, 6e-2)


@requires_cuda
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_with_piecewise_graphs_generates_as_eager(model_factory, async_scheduling):
    """fp32, greedy: the same tokens with piecewise graphs as with none, prompts long enough for several buckets."""
    from spool.engine import LLM, SamplingParams

    rng = random.Random(11)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 500) for _ in range(rng.randrange(5, 400))]} for _ in range(24)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = []
    for tokens in (0, 600):
        llm = LLM(str(model_factory("qwen3")), device="cuda", dtype="float32", block_size=16, max_num_seqs=16,
                  max_num_batched_tokens=600, num_kv_blocks=512, piecewise_graph_tokens=tokens,
                  async_scheduling=async_scheduling)
        assert (llm.engine.runner.piecewise is None) == (tokens == 0)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert outs[0] == outs[1]


@requires_cuda
def test_start_up_measurement_picks_a_size(tiny_llama):
    """piecewise_graph_tokens unset: measured at start-up; a tiny model's eager steps are host-bound at any size."""
    from spool.engine import LLM

    llm = LLM(str(tiny_llama), device="cuda", dtype="bfloat16", block_size=16, max_num_seqs=16,
              max_num_batched_tokens=1024, num_kv_blocks=256)
    assert llm.engine.runner.piecewise_graph_tokens == 1024


@requires_cuda
def test_kv_cache_sized_after_the_graphs_memory(tiny_llama):
    """num_kv_blocks unset: every graph is captured once over a one-block cache and the memory that took is set
    aside before the KV cache is sized. With every graph captured, torch holds no more than
    gpu_memory_utilization of the device, the real graphs take no more than was set aside, and a dry capture gives
    its memory back."""
    from spool.engine import LLM

    util = 0.25
    llm = LLM(str(tiny_llama), device="cuda", dtype="bfloat16", block_size=16, max_num_seqs=64,
              max_num_batched_tokens=2048, gpu_memory_utilization=util, piecewise_graph_tokens=2048)
    runner = llm.engine.runner
    assert runner.graphs is not None and runner.piecewise_graph_tokens == 2048
    assert 0 < runner.graph_bytes <= runner.graph_bytes_set_aside + (2 << 20)
    # The caching allocator reserves whole segments, so what it holds may pass the budget by a few MiB (5 MiB seen).
    slack = 32 << 20
    assert torch.cuda.memory_reserved() <= torch.cuda.mem_get_info()[1] * util + slack
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    scratch = runner._allocate_kv(1)
    tokens, again = runner._graph_bytes(scratch, 2048)
    assert tokens == 2048 and 0 < again <= runner.graph_bytes_set_aside + (2 << 20)
    del scratch
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() <= before + (2 << 20)  # a dry capture gives its memory back
