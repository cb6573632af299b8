"""write_kv_cache: scatter this step's K and V rows into the paged caches through slot_mapping.

Computes spool.kernels.reference.write_kv_cache. One program per token copies all Hk x D values of K
and of V (cast to the cache dtype); slots < 0 (padding tokens) write nothing. An fp8 (e4m3) cache
stores x / scale saturated to +-448, NaN as 0 (spool.kernels.fp8); other caches ignore the scales.

Layouts: k, v [T, Hk, D] any strides (views into a fused qkv tensor are fine); k/v_cache
[num_blocks, block_size, Hk, D] any strides; slot_mapping [T] int64 or int32, slot =
block_id * block_size + row. spool.kernels.kv_layout.allocate_kv_cache makes the engine's caches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spool.kernels.fp8 import is_fp8
from spool.kernels.interpreter import interpreting, round_to_e4m3
from spool.kernels.sizes import next_power_of_2


@triton.jit
def _quantize(x, scale, FP8: tl.constexpr, EMULATE_ROUNDING: tl.constexpr):
    if FP8:
        x = x.to(tl.float32) / scale
        x = tl.where(x == x, x, 0.0)  # NaN as 0: an fp8 cache never holds NaN (spool.kernels.kv_layout)
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)  # saturate: spool.kernels.fp8.FP8_MAX
        if EMULATE_ROUNDING:
            x = round_to_e4m3(x)
    return x


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_scale, v_scale,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kct, stride_kch, stride_kcd, stride_vcb, stride_vct, stride_vch, stride_vcd,
    num_heads, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    FP8: tl.constexpr, EMULATE_ROUNDING: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE
    row = slot % PAGE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < HEAD_DIM)
    k = tl.load(k_ptr + tok * stride_kt + h * stride_kh + d * stride_kd, mask=mask)  # [BLOCK_H, BLOCK_D]
    v = tl.load(v_ptr + tok * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    k = _quantize(k, k_scale, FP8, EMULATE_ROUNDING)
    v = _quantize(v, v_scale, FP8, EMULATE_ROUNDING)
    kc = kc_ptr + blk * stride_kcb + row * stride_kct + h * stride_kch + d * stride_kcd
    vc = vc_ptr + blk * stride_vcb + row * stride_vct + h * stride_vch + d * stride_vcd
    tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Scatter k, v [T, Hk, D] into k/v_cache [blocks, block_size, Hk, D] at slot_mapping [T]; slots < 0 skipped.

    fp8 caches store k / k_scale and v / v_scale (saturated); other caches ignore the scales.
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"write_kv_cache: k and v must both be [T, Hk, D]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"write_kv_cache: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be "
                         f"[blocks, block_size, {k.shape[1]}, {k.shape[2]}]")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"write_kv_cache: slot_mapping must be int32/int64 [{k.shape[0]}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if len({t.device for t in (k, v, k_cache, v_cache, slot_mapping)}) != 1:
        raise ValueError("write_kv_cache: all tensors must be on one device")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"write_kv_cache: k and v caches differ in dtype ({k_cache.dtype}, {v_cache.dtype})")
    fp8 = is_fp8(k_cache.dtype)
    if fp8 and not (k_scale > 0 and v_scale > 0):
        raise ValueError(f"write_kv_cache: fp8 scales must be > 0, got k {k_scale}, v {v_scale}")
    t, hk, d = k.shape
    if t == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale),
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        hk, HEAD_DIM=d, BLOCK_H=next_power_of_2(hk), BLOCK_D=next_power_of_2(d),
        PAGE=k_cache.shape[1], FP8=fp8, EMULATE_ROUNDING=fp8 and interpreting(),
        num_warps=4,
    )
