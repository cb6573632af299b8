"""bench/eager_host.py: the eager forward's Triton launches per layer, counted with the launches stubbed out."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels stay interpretable for the tests after this one

from bench.eager_host import measure  # noqa: E402
from spool.kernels import reference  # noqa: E402
from spool.kernels.triton_ops import TRITON_OPS as T  # noqa: E402


def test_qwen3_layer_launches_one_kernel_for_q_k_norm_and_rotary():
    res = measure("qwen3", steps=5)
    n = res["layers"]
    assert res["us_per_layer"] > 0
    assert 0 < res["attention_us_per_layer"] < res["us_per_layer"]  # piecewise steps keep only attention eager
    # Per layer: two norms (the first layer's input norm has no residual to add), q/k norm + rotary, the KV write,
    # two attention launches (prompt chunks, then the decode rows beside them), SiLU-and-mul; one final norm.
    assert res["launches_per_forward"] == {"_rms_norm_kernel": 2 * n + 1, "_qk_norm_rotary_kernel": n,
                                           "_write_kv_kernel": n, "_paged_attn_kernel": 2 * n,
                                           "_silu_and_mul_kernel": n}


def test_llama_layer_rotates_without_norms_and_the_stubs_are_undone():
    res = measure("llama", steps=5)
    assert res["launches_per_forward"]["_rotary_kernel"] == res["layers"]
    assert "_qk_norm_rotary_kernel" not in res["launches_per_forward"]
    x, w = torch.randn(3, 16), torch.randn(16)
    torch.testing.assert_close(T.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))  # a real kernel ran again
