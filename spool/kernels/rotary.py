"""Neox-style (rotate-half) rotary embedding of q and k, with spool.kernels.reference's numerics.

For each token t at position p = positions[t], with cos = cos_sin_cache[p, :D/2] and
sin = cos_sin_cache[p, D/2:]: x' = [x1 * cos - x2 * sin, x2 * cos + x1 * sin] for x = [x1 | x2]
in every head of q and k, computed in float32 and stored in the input dtype.

Layouts: positions [T] int64/int32; q [T, Hq, D], k [T, Hk, D] any strides (views into a fused
qkv tensor are fine); cos_sin_cache [max_pos, D] float32, row-contiguous. One program per token
rotates all heads of q and of k. The rotary dimension is the full head_dim (as in the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spool.kernels.sizes import next_power_of_2


@triton.jit
def _rotate(ptr, out_ptr, tok, stride_t, stride_h, stride_d, ostride_t, ostride_h, ostride_d,
            num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (d < HALF)
    base = ptr + tok * stride_t + h * stride_h
    x1 = tl.load(base + d * stride_d, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(base + (d + HALF) * stride_d, mask=mask, other=0.0).to(tl.float32)
    obase = out_ptr + tok * ostride_t + h * ostride_h
    dt = out_ptr.dtype.element_ty
    tl.store(obase + d * ostride_d, (x1 * cos - x2 * sin).to(dt), mask=mask)
    tl.store(obase + (d + HALF) * ostride_d, (x2 * cos + x1 * sin).to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, cs_ptr, stride_cs,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_qot, stride_qoh, stride_qod, stride_kot, stride_koh, stride_kod,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0)  # [1, BLOCK_HALF]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d, mask=d < HALF, other=0.0)
    _rotate(q_ptr, qo_ptr, tok, stride_qt, stride_qh, stride_qd, stride_qot, stride_qoh, stride_qod,
            num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate(k_ptr, ko_ptr, tok, stride_kt, stride_kh, stride_kd, stride_kot, stride_koh, stride_kod,
            num_k_heads, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def check_rotary_args(name: str, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      cos_sin_cache: torch.Tensor, *others: torch.Tensor) -> None:
    """The layouts the module docstring names (q, k of one float dtype; `others` on their device too), or a
    one-line error naming the op."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{name}: want q [T, Hq, D], k [T, Hk, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    t, _, d = q.shape
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != d or d % 2:
        raise ValueError(f"{name}: cos_sin_cache must be [max_pos, {d}] (even head_dim), "
                         f"got {tuple(cos_sin_cache.shape)}")
    if cos_sin_cache.dtype != torch.float32:
        raise TypeError(f"{name}: cos_sin_cache must be float32, got {cos_sin_cache.dtype}")
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: positions must be int [{t}], got {positions.dtype} {tuple(positions.shape)}")
    if k.dtype != q.dtype or not q.is_floating_point():
        raise TypeError(f"{name}: q and k must share a float dtype, got {q.dtype}, {k.dtype}")
    if len({x.device for x in (positions, q, k, cos_sin_cache, *others)}) != 1:
        raise ValueError(f"{name}: all tensors must be on one device")


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary on q [T, Hq, D] and k [T, Hk, D] at positions [T]; returns (q', k').

    Out of place by default (like the reference); inplace=True rotates q and k in their own
    storage (e.g. inside a fused qkv tensor) and returns them.
    """
    check_rotary_args("rotary_embedding", positions, q, k, cos_sin_cache)
    t, hq, d = q.shape
    q_out = q if inplace else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = k if inplace else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    cs = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    hk = k.shape[1]
    _rotary_kernel[(t,)](
        positions.contiguous(), q, k, q_out, k_out, cs, cs.stride(0),
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), hq, hk,
        HALF=d // 2, BLOCK_HALF=next_power_of_2(d // 2),
        BLOCK_HQ=next_power_of_2(hq), BLOCK_HK=next_power_of_2(hk), num_warps=4,
    )
    return q_out, k_out
