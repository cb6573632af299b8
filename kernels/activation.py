"""silu_and_mul: the SwiGLU gate, silu(gate) * up, with kernels.reference's numerics.

x [..., 2d] = [gate | up] -> [..., d]. Like torch on 16-bit inputs, silu(gate) is rounded to the
input dtype before the product, which is rounded again. Rows may be strided (unit last stride;
other layouts are copied). Grid: (rows, cdiv(d, BLOCK)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(dt), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2*d] = [gate | up] -> silu(gate) * up, [..., d]."""
    if x.dim() < 1 or x.shape[-1] % 2 or not x.is_floating_point():
        raise ValueError(f"silu_and_mul: want a float [..., 2*d] tensor, got {x.dtype} {tuple(x.shape)}")
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] and d:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d,
                                                                     BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], d)
