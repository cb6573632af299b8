"""silu_and_mul: the SwiGLU gate, silu(gate) * up, with spool.kernels.reference's numerics; and its FP8 variant.

x [..., 2d] = [gate | up] -> [..., d]. Like torch on 16-bit inputs, silu(gate) is rounded to the
input dtype before the product, which is rounded again. Rows may be strided (unit last stride;
other layouts are copied). Grid: (rows, cdiv(d, BLOCK)).

silu_and_mul_quant: the same rounded products, per-token quantized to FP8 in the same program with
spool.kernels.fp8_quant's numerics, so it equals quantize_per_token_fp8(silu_and_mul(x)) bit for bit:
(q float8_e4m3fn [..., d], scale float32 [..., 1]). One program per row: a row of up to `max_block`
(16,384: llama3-8b's d = 14,336) products is computed once and kept in registers (97 registers at 16 warps
on sm_90, no spills); a longer one is computed twice in chunks (spool.kernels.fp8_quant.tile_for), amax first,
then quantize (the second read of gate/up mostly hits L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spool.kernels.fp8 import MIN_SCALE
from spool.kernels.fp8_quant import (
    MAX_BLOCK,
    QUANT_INPUT_DTYPES,
    TL_DTYPES,
    num_warps_for,
    quant_outputs,
    row_scale,
    tile_for,
    to_e4m3,
)
from spool.kernels.interpreter import interpreting
from spool.kernels.sizes import cdiv, next_power_of_2


@triton.jit
def _silu_mul(gate, up, DT: tl.constexpr):
    """float32 gate, up -> silu(gate) rounded to DT, times up, rounded to DT."""
    act = (gate / (1.0 + tl.exp(-gate))).to(DT).to(tl.float32)
    return (act * up).to(DT)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, _silu_mul(gate, up, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_silu_mul(x_row, offs, d, DT: tl.constexpr):
    """One chunk of a row's products, as float32 (0 past d)."""
    mask = offs < d
    gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + d + offs, mask=mask, other=0.0).to(tl.float32)
    return _silu_mul(gate, up, DT).to(tl.float32)


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, d, DT: tl.constexpr,
                               MIN: tl.constexpr, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
                               EMULATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    if ONE_TILE:
        y = _load_silu_mul(x_row, offs, d, DT)
        scale = row_scale(tl.max(tl.abs(y), 0), MIN)
        tl.store(q_row + offs, to_e4m3(y, scale, EMULATE), mask=offs < d)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, d, BLOCK):
            amax = tl.maximum(amax, tl.abs(_load_silu_mul(x_row, start + offs, d, DT)))
        scale = row_scale(tl.max(amax, 0), MIN)
        for start in range(0, d, BLOCK):
            y = _load_silu_mul(x_row, start + offs, d, DT)
            tl.store(q_row + start + offs, to_e4m3(y, scale, EMULATE), mask=start + offs < d)
    tl.store(scale_ptr + row, scale)


def _gate_up_rows(x: torch.Tensor, name: str, dtypes) -> torch.Tensor:
    """x [..., 2*d] -> [N, 2*d] with a unit last stride (a view when possible)."""
    if x.dim() < 1 or x.shape[-1] % 2 or x.dtype not in dtypes:
        raise ValueError(f"{name}: want a {'/'.join(str(t).removeprefix('torch.') for t in dtypes)} [..., 2*d] "
                         f"tensor, got {x.dtype} {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2*d] = [gate | up] -> silu(gate) * up, [..., d]."""
    x2 = _gate_up_rows(x, "silu_and_mul", tuple(TL_DTYPES))
    d = x.shape[-1] // 2
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] and d:
        block = min(1024, next_power_of_2(d))
        _silu_and_mul_kernel[(x2.shape[0], cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d,
                                                                     BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], d)


def silu_and_mul_quant(x: torch.Tensor, *, max_block: int = MAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., 2*d] = [gate | up] -> silu_and_mul(x) per-token quantized: (e4m3 [..., d], float32 [..., 1]).

    max_block (a power of 2) caps the one-tile path: longer rows take the two-pass chunked path.
    """
    x2 = _gate_up_rows(x, "silu_and_mul_quant", QUANT_INPUT_DTYPES)
    d = x.shape[-1] // 2
    if d == 0:
        raise ValueError("silu_and_mul_quant: empty rows have no scale")
    q, scale = quant_outputs(x2.shape[0], d, x.device)
    if x2.shape[0]:
        block, one_tile = tile_for(d, max_block)
        _silu_and_mul_quant_kernel[(x2.shape[0],)](
            x2, q, scale, x2.stride(0), q.stride(0), d, DT=TL_DTYPES[x.dtype], MIN=MIN_SCALE, BLOCK=block,
            ONE_TILE=one_tile, EMULATE=interpreting(), num_warps=num_warps_for(block),
        )
    return q.view(*x.shape[:-1], d), scale.view(*x.shape[:-1], 1)
