"""quantize_per_token_fp8: dynamic per-token FP8 (e4m3) quantization of activations in one kernel.

Computes spool.kernels.reference.quantize_per_token_fp8 bit for bit: per row, amax = max |x| (exact), scale =
max(amax / 448, MIN_SCALE) and q = x / scale, both IEEE float32 divisions (tl.math.div_rn: Triton's plain
`/` is an approximate division on NVIDIA GPUs), q saturated to +-448 and rounded to nearest-even e4m3.
Saturation changes nothing for finite rows (|x / scale| <= 448 up to one ulp, which rounds to 448); rows
holding NaN are unspecified (the reference's scale is NaN, Triton's max may skip NaN).

Layouts: x [..., K] float32/float16/bfloat16 with a unit last stride (rows may be strided; other layouts are
copied) -> q [..., K] float8_e4m3fn contiguous and scale [..., 1] float32. One program per row: a row of up
to `max_block` (16,384) elements is read once and kept in registers; a longer one (llama3-70b's 28,672) is
read twice in chunks of 4,096, amax first, then quantize (the second read mostly hits L2). (Register use on
sm_90, from ptxas: 89 for a 16,384 tile at 16 warps, 85 for a 4,096 chunk at 8 warps, no spills; a 16,384
chunk spills.) No host syncs, shapes fixed by x: safe inside CUDA graphs.

The @triton.jit helpers `row_scale` and `to_e4m3` are the one definition of these numerics that the fused
producers (spool.kernels.rms_norm.rms_norm_quant, spool.kernels.activation.silu_and_mul_quant) use too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spool.kernels.fp8 import FP8_DTYPE, MIN_SCALE
from spool.kernels.interpreter import interpreting, round_to_e4m3
from spool.kernels.sizes import next_power_of_2

MAX_BLOCK = 16384  # longest row kept in registers (16 warps: 32 float32 per thread)
CHUNK = 4096  # tile of the two-pass path for longer rows
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}
QUANT_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 would divide in float64


def num_warps_for(block: int) -> int:
    """Warps for a one-row program over `block` elements."""
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def tile_for(k: int, max_block: int) -> tuple[int, bool]:
    """(BLOCK, ONE_TILE) for rows of k elements: the whole row when it fits max_block, else CHUNK-sized chunks."""
    block = next_power_of_2(k)
    return (block, True) if block <= max_block else (min(CHUNK, max_block), False)


@triton.jit
def row_scale(amax, MIN: tl.constexpr):
    """max(amax / 448, MIN) in float32 with an IEEE division (the reference's scale)."""
    return tl.maximum(tl.math.div_rn(amax, 448.0), MIN)  # 448: spool.kernels.fp8.FP8_MAX


@triton.jit
def to_e4m3(y, scale, EMULATE: tl.constexpr):
    """float32 y / scale (IEEE division), saturated to +-448, as e4m3 rounded to nearest even."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -448.0), 448.0)
    if EMULATE:
        v = round_to_e4m3(v)
    return v.to(tl.float8e4nv)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, K, MIN: tl.constexpr,
                          BLOCK: tl.constexpr, ONE_TILE: tl.constexpr, EMULATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    if ONE_TILE:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        scale = row_scale(tl.max(tl.abs(x), 0), MIN)
        tl.store(q_row + offs, to_e4m3(x, scale, EMULATE), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            mask = start + offs < K
            x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = row_scale(tl.max(amax, 0), MIN)
        for start in range(0, K, BLOCK):
            mask = start + offs < K
            x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + start + offs, to_e4m3(x, scale, EMULATE), mask=mask)
    tl.store(scale_ptr + row, scale)


def quant_outputs(rows: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (q [rows, k] float8_e4m3fn, scale [rows, 1] float32)."""
    return (torch.empty((rows, k), dtype=FP8_DTYPE, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


def quantize_per_token_fp8(x: torch.Tensor, *, max_block: int = MAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], float32 scale [..., 1]), bit for bit spool.kernels.reference's numerics.

    max_block (a power of 2) caps the one-tile path: longer rows take the two-pass chunked path.
    """
    if x.dim() < 1 or x.dtype not in QUANT_INPUT_DTYPES or x.shape[-1] == 0:
        raise ValueError(f"quantize_per_token_fp8: want a float32/float16/bfloat16 [..., K>0] tensor, "
                         f"got {x.dtype} {tuple(x.shape)}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q, scale = quant_outputs(x2.shape[0], k, x.device)
    if x2.shape[0]:
        block, one_tile = tile_for(k, max_block)
        _quantize_rows_kernel[(x2.shape[0],)](
            x2, q, scale, x2.stride(0), q.stride(0), k, MIN=MIN_SCALE, BLOCK=block, ONE_TILE=one_tile,
            EMULATE=interpreting(), num_warps=num_warps_for(block),
        )
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)
