"""The LM head on a few row counts only, so a new batch size never loads a GEMM kernel mid-run.

A step samples from 1 to max_running_seqs rows, a different count almost every step while prompts are admitted
or sequences finish. cuBLAS picks its GEMM kernel per shape, and CUDA loads a kernel lazily on its first launch;
that load can synchronize the context. Measured on the H200 (bench/profile_step.py --trace, fifth session): in
the prefill phase of the llama3-8b workload each step's LM head GEMM (216, 230, 245, ... rows) held the host
70-85 ms inside aten::mm, until the GPU had drained the step before; the next step's metadata was built only
then, so the GPU idled ~10 ms per ~130 ms step. On CUDA the LM head therefore runs on the rows rounded up to a
multiple of ROW_BUCKET (zero rows appended, their logits dropped), and every bucket up to max_running_seqs is
launched once at start-up. Off CUDA the rows go through as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_BUCKET = 64  # at most 63 padded rows: the LM head reads its weight once whatever the rows (memory-bound)


def bucketed_rows(rows: int) -> int:
    """rows rounded up to a multiple of ROW_BUCKET."""
    return -(-rows // ROW_BUCKET) * ROW_BUCKET


def compute_logits(model, hidden: torch.Tensor, pad: bool | None = None) -> torch.Tensor | None:
    """model.compute_logits(hidden) [S, vocab] (None on tensor-parallel ranks other than 0), through the row
    bucket of S when `pad` (default: on CUDA)."""
    rows = hidden.shape[0]
    if pad is None:
        pad = hidden.device.type == "cuda"
    if not pad or rows == bucketed_rows(rows):
        return model.compute_logits(hidden)
    logits = model.compute_logits(F.pad(hidden, (0, 0, 0, bucketed_rows(rows) - rows)))
    return None if logits is None else logits[:rows]


def load_logits_kernels(model, hidden_size: int, dtype: torch.dtype, device: torch.device, max_rows: int) -> None:
    """Run the LM head once at every row bucket up to max_rows, so each shape's kernels are loaded before the
    first step (every tensor-parallel rank calls this alike: the head's gather is a collective)."""
    if device.type != "cuda":
        return
    hidden = torch.zeros(bucketed_rows(max_rows), hidden_size, dtype=dtype, device=device)
    with torch.inference_mode():
        for rows in range(ROW_BUCKET, hidden.shape[0] + 1, ROW_BUCKET):
            compute_logits(model, hidden[:rows])
    torch.cuda.synchronize(device)
