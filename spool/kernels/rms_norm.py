"""RMSNorm and fused residual-add + RMSNorm, with spool.kernels.reference's numerics.

rms_norm: y = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), the mean taken in float32, the
product rounded once to the promoted dtype of (weight, x) like torch's `weight * xf.to(x.dtype)`.
fused_add_rms_norm: r' = to_dtype(x + residual); returns (rms_norm(r'), r').
rms_norm_quant / fused_add_rms_norm_quant: the same normed rows (rounded to their dtype, as above), per-token
quantized to FP8 in the same program with spool.kernels.fp8_quant's numerics, so they equal
quantize_per_token_fp8(rms_norm(...)) bit for bit: (q float8_e4m3fn [..., hidden], scale float32 [..., 1]).

Layouts: x, residual [..., hidden], rows may be strided (other layouts are copied); weight [hidden].
One program per row; the whole row sits in one tile (hidden <= 65536).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spool.kernels.fp8 import MIN_SCALE
from spool.kernels.fp8_quant import (
    QUANT_INPUT_DTYPES,
    TL_DTYPES,
    num_warps_for,
    quant_outputs,
    row_scale,
    to_e4m3,
)
from spool.kernels.interpreter import interpreting
from spool.kernels.sizes import next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, stride_x, stride_res, stride_out, stride_res_out,
    hidden, eps, ADD: tl.constexpr, NORM_DTYPE: tl.constexpr, QUANT: tl.constexpr, MIN: tl.constexpr,
    EMULATE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:
        s = x.to(tl.float32) + tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        x = s.to(x_ptr.dtype.element_ty)  # the residual stream is kept in the activation dtype
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    xn = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (w * xn).to(NORM_DTYPE)  # what rms_norm returns
    if QUANT:  # out_ptr is fp8: store y / scale, one scale per row
        yf = y.to(tl.float32)
        scale = row_scale(tl.max(tl.abs(yf), 0), MIN)
        tl.store(out_ptr + row * stride_out + offs, to_e4m3(yf, scale, EMULATE), mask=mask)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * stride_out + offs, y, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., hidden] -> [N, hidden] with a unit last stride: a view when possible, else a copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"{name}: weight must be [{x.shape[-1] if x.dim() else '?'}], got {tuple(weight.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"{name}: x and weight must be floating point, got {x.dtype}, {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name}: x on {x.device}, weight on {weight.device}")


def _check_quant(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    _check(x, weight, name)
    if torch.promote_types(weight.dtype, x.dtype) not in QUANT_INPUT_DTYPES:
        raise TypeError(f"{name}: the normed rows must be float32/float16/bfloat16, got {x.dtype} x {weight.dtype}")


def _check_residual(x: torch.Tensor, residual: torch.Tensor, name: str) -> None:
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"{name}: residual {tuple(residual.shape)} {residual.dtype} must match "
                         f"x {tuple(x.shape)} {x.dtype} on {x.device}")


def _launch(x, res, weight, eps, out, res_out, add: bool, scale=None) -> None:
    """One program per row; `scale` given: out is fp8 and receives the quantized normed rows."""
    hidden = x.shape[-1]
    n = x.shape[0]
    if n == 0:
        return
    block = next_power_of_2(hidden)
    norm_dtype = torch.promote_types(weight.dtype, x.dtype)
    _rms_norm_kernel[(n,)](
        x, res if add else x, weight, out, res_out if add else out, out if scale is None else scale, x.stride(0),
        res.stride(0) if add else 0, out.stride(0), res_out.stride(0) if add else 0,
        hidden, eps, ADD=add, NORM_DTYPE=TL_DTYPES[norm_dtype], QUANT=scale is not None, MIN=MIN_SCALE,
        EMULATE=interpreting(), BLOCK=block, num_warps=num_warps_for(block),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., hidden] with weight [hidden]; same numerics as spool.kernels.reference.rms_norm."""
    _check(x, weight, "rms_norm")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(x2, None, weight, eps, out, None, add=False)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual').

    Out of place by default (like the reference). inplace=True writes the normed rows into x and
    residual' into residual and returns (x, residual); needs weight.dtype == x.dtype.
    """
    _check(x, weight, "fused_add_rms_norm")
    _check_residual(x, residual, "fused_add_rms_norm")
    x2, r2 = _rows(x), _rows(residual)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if inplace:
        if out_dtype != x.dtype or x2.data_ptr() != x.data_ptr() or r2.data_ptr() != residual.data_ptr():
            raise ValueError("fused_add_rms_norm(inplace=True): needs weight.dtype == x.dtype and x, residual "
                             "viewable as [rows, hidden] with a unit last stride")
        _launch(x2, r2, weight, eps, x2, r2, add=True)
        return x, residual
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    new_res = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch(x2, r2, weight, eps, out, new_res, add=True)
    return out.view(x.shape), new_res.view(x.shape)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(x, weight, eps) per-token quantized: (e4m3 [..., hidden], float32 scale [..., 1])."""
    _check_quant(x, weight, "rms_norm_quant")
    x2 = _rows(x)
    q, scale = quant_outputs(x2.shape[0], x2.shape[1], x.device)
    _launch(x2, None, weight, eps, q, None, add=False, scale=scale)
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def fused_add_rms_norm_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """fused_add_rms_norm with the normed rows per-token quantized: ((e4m3, float32 scale [..., 1]), residual')."""
    _check_quant(x, weight, "fused_add_rms_norm_quant")
    _check_residual(x, residual, "fused_add_rms_norm_quant")
    x2, r2 = _rows(x), _rows(residual)
    q, scale = quant_outputs(x2.shape[0], x2.shape[1], x.device)
    new_res = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch(x2, r2, weight, eps, q, new_res, add=True, scale=scale)
    return (q.view(x.shape), scale.view(*x.shape[:-1], 1)), new_res.view(x.shape)
