"""Paged attention under Nsight Compute: one case, warmed up, then a few launches (and SDPA's, as a peer).

  ncu --clock-control none --profile-from-start off -k regex:'paged_attn|flash|attention|fmha' \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      python3 bench/profile_attn.py [--case decode|decode-workload|prefill] [--kv bf16|fp8] [--block-size 16]

Cases (32/8 heads, d128, bf16 q):
  decode           B=64 x 4096 context, bench/kernel_speeds.py's default shape (SDPA decode on contiguous bf16 K/V too)
  decode-workload  512 sequences with the llama3-8b bulk workload's contexts, U[128,1024] + 16
  prefill          2048 new tokens, no cached prefix, keys from the step's own qkv (k/v_new) as the engine runs
                   them (SDPA causal on 2048 contiguous tokens too)
Each kernel runs after a warm-up; only the launches between cudaProfilerStart and Stop are profiled (no compiles).
--triton-dump DIR copies the compiled kernels' TTGIR and PTX there (what Triton made of the layouts).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # spool and bench from this checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.attn_workload import D, HK, HQ, paged  # noqa: E402
from spool.kernels.paged_attention import _paged_attn_kernel, paged_attention  # noqa: E402


def _case(a, gen):
    """(spool's call, SDPA's call or None) for the case."""
    scale = D**-0.5
    if a.case == "prefill":
        n = 2048
        q, kc, vc, bt, sl, qsl, kn, vn = paged([n], [n], a.block_size, torch.bfloat16, a.kv, gen)
        qs = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        ks = torch.randn(1, HK, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        vs = torch.randn_like(ks)
        return (lambda: paged_attention(q, kc, vc, bt, sl, qsl, scale, max_query_len=n, max_seq_len=n,
                                        k_new=kn, v_new=vn),
                lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True))
    if a.case == "decode":
        ctxs = [4096] * 64
    else:
        ctxs = (torch.randint(128, 1025, (512,), generator=torch.Generator().manual_seed(0)) + 16).tolist()
    q, kc, vc, bt, sl, qsl, _, _ = paged(ctxs, [1] * len(ctxs), a.block_size, torch.bfloat16, a.kv, gen)
    mx = max(ctxs)
    spool = lambda: paged_attention(q, kc, vc, bt, sl, qsl, scale, max_query_len=1, max_seq_len=mx)  # noqa: E731
    if a.case != "decode":
        return spool, None
    qs = q.reshape(64, HQ, 1, D)
    ks = torch.randn(64, HK, 4096, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    vs = torch.randn_like(ks)
    return spool, lambda: F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)


def _dump_triton(dest: Path) -> None:
    """The compiled variants of the paged kernel on this device: TTGIR (layouts, conversions) and PTX."""
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for cache in _paged_attn_kernel.device_caches.values():
        for compiled in cache[0].values():
            n += 1
            for ext in ("ttgir", "ptx"):
                if ext in compiled.asm:
                    (dest / f"paged_attn_{n}.{ext}").write_text(compiled.asm[ext])
            meta = compiled.metadata
            (dest / f"paged_attn_{n}.meta").write_text(
                f"num_warps={meta.num_warps} num_stages={meta.num_stages} shared={meta.shared}\n")
    print(f"dumped {n} compiled variants of the paged kernel to {dest}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["decode", "decode-workload", "prefill"], default="decode")
    p.add_argument("--kv", choices=["bf16", "fp8", "fp8-keysV"], default="bf16",
                   help="fp8: V row-major as the engine stores it; fp8-keysV: V keys-fastest (spool.kernels.kv_layout)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--launches", type=int, default=2)
    p.add_argument("--triton-dump", type=Path)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/profile_attn.py needs a CUDA GPU", file=sys.stderr)
        return 2
    spool, sdpa = _case(a, torch.Generator(device="cuda").manual_seed(0))
    for _ in range(3):  # warm-up: compile outside the profiled launches
        spool()
        if sdpa is not None:
            sdpa()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()  # with `ncu --profile-from-start off`, only these launches are profiled
    for _ in range(a.launches):
        spool()
        if sdpa is not None:
            sdpa()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled {a.launches} launches of paged_attention ({a.case}, {a.kv} KV, block {a.block_size})"
          + (" and of SDPA" if sdpa is not None else ""))
    if a.triton_dump:
        _dump_triton(a.triton_dump)
    return 0


if __name__ == "__main__":
    sys.exit(main())
