"""Per-head RMSNorm of q and k (Qwen3's q_norm / k_norm) and their rotary embedding, in one kernel.

Computes spool.kernels.reference.qk_norm_rotary: rotary_embedding(positions, rms_norm(q, q_weight, eps),
rms_norm(k, k_weight, eps), cos_sin_cache), with the numerics of spool.kernels.rms_norm (mean of squares in float32,
the normalized row rounded to the input dtype, then scaled and rounded to promote(weight, input)) and of
spool.kernels.rotary (rotation in float32, stored in that dtype).

Why one kernel: q and k are views into the fused qkv; a per-head norm over a strided view first copied it into
rows (reshape), so each layer ran two copies, two norm launches and a rotary launch, each reading and writing
every q/k element. On the H200 at 256 decoding rows of qwen3-0.6b those were 56 copies, 56 norms and 28 rotary
launches per step: 0.36 ms of a 6.7 ms step (copies 0.14, norms ~0.15, rotary 0.07 ms;
bench/results/2026-12-02-fourth/run1-profile_qwen3.json).

Layouts: positions [T] int; q [T, Hq, D], k [T, Hk, D] any strides; weights [D]; cos_sin_cache [max_pos, D]
float32 (cos in [:D/2], sin in [D/2:]). Outputs are new contiguous [T, H, D] tensors. One program per token
normalizes and rotates all heads of q and of k: each head's row is read once, as its two halves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spool.kernels.fp8_quant import TL_DTYPES
from spool.kernels.rotary import check_rotary_args
from spool.kernels.sizes import next_power_of_2


@triton.jit
def _norm_rotate(ptr, out_ptr, w_ptr, tok, stride_t, stride_h, stride_d, num_heads, cos, sin, eps,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM_DTYPE: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (d < HALF)
    base = ptr + tok * stride_t + h * stride_h
    x1 = tl.load(base + d * stride_d, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(base + (d + HALF) * stride_d, mask=mask, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    inv = tl.math.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / (2 * HALF) + eps)[:, None]  # [BLOCK_H, 1]
    w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    dt = x1.dtype
    n1 = (w1 * (f1 * inv).to(dt).to(tl.float32)).to(NORM_DTYPE).to(tl.float32)  # rms_norm's output, rounded
    n2 = (w2 * (f2 * inv).to(dt).to(tl.float32)).to(NORM_DTYPE).to(tl.float32)
    obase = out_ptr + tok * (num_heads * 2 * HALF) + h * (2 * HALF)  # contiguous [T, H, D]
    tl.store(obase + d, (n1 * cos - n2 * sin).to(NORM_DTYPE), mask=mask)
    tl.store(obase + HALF + d, (n2 * cos + n1 * sin).to(NORM_DTYPE), mask=mask)


@triton.jit
def _qk_norm_rotary_kernel(
    pos_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, cs_ptr, stride_cs,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, num_q_heads, num_k_heads, eps,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    NORM_DTYPE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0)  # [1, BLOCK_HALF]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d, mask=d < HALF, other=0.0)
    _norm_rotate(q_ptr, qo_ptr, qw_ptr, tok, stride_qt, stride_qh, stride_qd, num_q_heads, cos, sin, eps,
                 HALF, BLOCK_HQ, BLOCK_HALF, NORM_DTYPE)
    _norm_rotate(k_ptr, ko_ptr, kw_ptr, tok, stride_kt, stride_kh, stride_kd, num_k_heads, cos, sin, eps,
                 HALF, BLOCK_HK, BLOCK_HALF, NORM_DTYPE)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def qk_norm_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    eps: float, cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q', k') = rotary of the per-head RMSNorms of q [T, Hq, D] and k [T, Hk, D]; see the module docstring."""
    check_rotary_args("qk_norm_rotary", positions, q, k, cos_sin_cache, q_weight, k_weight)
    t, hq, d = q.shape
    hk = k.shape[1]
    if q_weight.shape != (d,) or k_weight.shape != (d,) or q_weight.dtype != k_weight.dtype:
        raise ValueError(f"qk_norm_rotary: q/k weights must both be [{d}] of one dtype, got "
                         f"{tuple(q_weight.shape)} {q_weight.dtype}, {tuple(k_weight.shape)} {k_weight.dtype}")
    out_dtype = torch.promote_types(q_weight.dtype, q.dtype)
    if q.dtype not in _DTYPES or out_dtype not in _DTYPES:
        raise TypeError(f"qk_norm_rotary: q, k and the weights must be float32/float16/bfloat16, got {q.dtype}, "
                        f"weights {q_weight.dtype}")
    q_out = torch.empty((t, hq, d), dtype=out_dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=out_dtype, device=q.device)
    if t == 0:
        return q_out, k_out
    cs = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    _qk_norm_rotary_kernel[(t,)](
        positions.contiguous(), q, k, q_weight.contiguous(), k_weight.contiguous(), q_out, k_out, cs, cs.stride(0),
        *q.stride(), *k.stride(), hq, hk, eps,
        HALF=d // 2, BLOCK_HALF=next_power_of_2(d // 2),
        BLOCK_HQ=next_power_of_2(hq), BLOCK_HK=next_power_of_2(hk), NORM_DTYPE=TL_DTYPES[out_dtype],
        num_warps=4,
    )
    return q_out, k_out
