"""bench/shapes.py's named shapes load as model configs, and issue 16's llama3-70b is Llama-3-70B's and splits over
two tensor-parallel ranks; bench/profile_step.py files NCCL's kernels under collectives."""
from __future__ import annotations

import shutil

from bench.shapes import SHAPES, shape_dir
from spool.engine.config import EngineConfig, ModelConfig


def test_every_shape_loads_as_a_model_config():
    for name, cfg in SHAPES.items():
        d = shape_dir(name)
        try:
            mc = ModelConfig.from_dir(d)
        finally:
            shutil.rmtree(d)
        assert (mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.vocab_size) == (
            cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"]), name


def test_llama3_70b_is_70b_and_splits_over_two_ranks():
    d = shape_dir("llama3-70b")
    try:
        mc = ModelConfig.from_dir(d)
        EngineConfig(model=str(d), device="cpu", tensor_parallel_size=2).validate_for(mc)  # raises if it cannot
    finally:
        shutil.rmtree(d)
    h, kv = mc.hidden_size, mc.num_kv_heads * mc.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * mc.intermediate_size
    params = mc.num_layers * per_layer + 2 * mc.vocab_size * h  # untied embedding and LM head; norms aside
    assert 70.5e9 < params < 70.7e9, params
    assert (h, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.intermediate_size) == (8192, 80, 64, 8, 28672)


def test_profile_step_files_nccl_kernels_as_collectives():
    from bench.profile_step import _group

    assert _group("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)") == \
        "collectives (NCCL)"
    assert _group("ncclDevKernel_Gather_RING_LL") == "collectives (NCCL)"
    assert _group("void at::native::reduce_kernel<512, 1>") == "elementwise"
