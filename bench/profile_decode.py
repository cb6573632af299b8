"""Decode attention under Nsight Compute: spool's paged kernel and SDPA on the same shape, a few launches each.

  ncu --clock-control none --target-processes all -k regex:'paged_attn|flash|attention|fmha' \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      python3 bench/profile_decode.py
Shape as bench/kernels.py's default (B=64, ctx 4096, Hq 32 / Hk 8, D 128, bf16, block 16). Each kernel runs
after a warm-up, so ncu's report holds steady-state launches (compilation stays out of them).
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # this file must not shadow `kernels`
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.kernels import make_paged  # noqa: E402
import bench.kernels as kb  # noqa: E402
from kernels.paged_attention import paged_attention  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/profile_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    kb.DEV = "cuda"
    b, ctx, hq, hk, d, bs, dtype = 64, 4096, 32, 8, 128, 16, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, kc, vc, bt, sl, qsl = make_paged(b, ctx, hq, hk, d, bs, dtype, gen=gen)
    k = torch.randn(b, hk, ctx, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    qs = q.view(b, hq, 1, d)
    scale = d**-0.5
    for _ in range(3):  # warm-up: compile and autotune outside the profiled launches
        paged_attention(q, kc, vc, bt, sl, qsl, scale, max_query_len=1, max_seq_len=ctx)
        F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profiled")
    for _ in range(2):
        paged_attention(q, kc, vc, bt, sl, qsl, scale, max_query_len=1, max_seq_len=ctx)
        F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print("profiled 2 launches each of paged_attention and SDPA (enable_gqa)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
