"""spool/engine/logits_rows.py: the LM head through row buckets gives the same logits as on the exact rows."""
from __future__ import annotations

import pytest
import torch

from spool.engine import LLM
from spool.engine.logits_rows import ROW_BUCKET, bucketed_rows, compute_logits, load_logits_kernels


@pytest.fixture(scope="module")
def runner(tiny_llama):
    return LLM(str(tiny_llama), device="cpu", dtype="float32").engine.runner


def test_bucketed_rows():
    assert [bucketed_rows(n) for n in (1, ROW_BUCKET - 1, ROW_BUCKET, ROW_BUCKET + 1, 537)] == [
        ROW_BUCKET, ROW_BUCKET, ROW_BUCKET, 2 * ROW_BUCKET, 576]


@pytest.mark.parametrize("rows", [1, 7, ROW_BUCKET, ROW_BUCKET + 3])
def test_padded_logits_equal_the_exact_rows(runner, rows):
    hidden = torch.randn(rows, runner.model_cfg.hidden_size, generator=torch.Generator().manual_seed(rows))
    want = runner.model.compute_logits(hidden)
    got = compute_logits(runner.model, hidden, pad=True)
    assert got.shape == want.shape == (rows, want.shape[1]) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # row-wise the same GEMM; padding rows dropped
    assert compute_logits(runner.model, hidden) is not None  # off CUDA: no padding, the rows as they are


def test_load_logits_kernels_is_a_no_op_off_cuda(runner):
    load_logits_kernels(runner.model, runner.model_cfg.hidden_size, torch.float32, torch.device("cpu"), 600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_padded_logits_and_kernel_loading(tiny_llama):
    runner = LLM(str(tiny_llama), device="cuda", dtype="bfloat16").engine.runner  # loads every bucket at start-up
    for rows in (1, 37, 100, 200):
        hidden = torch.randn(rows, runner.model_cfg.hidden_size, device="cuda").to(torch.bfloat16)
        got = compute_logits(runner.model, hidden)  # padded on CUDA
        want = runner.model.compute_logits(hidden)
        assert got.shape == want.shape == (rows, want.shape[1])
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # another GEMM kernel: bf16 rounding apart
