"""What kernels need to know about Triton's CPU interpreter (TRITON_INTERPRET=1, how CI runs them).

interpreting(): whether kernels launched now run in the interpreter. round_to_e4m3: its float32 -> fp8 cast
drops the carry when the mantissa rounds up into the next binade (7.97 becomes 4.0, not 8.0), so kernels that
write e4m3 round on the grid first under the interpreter; casting a value already on the grid is exact. GPUs
cast with cvt.rn.satfinite and need none of this.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_to_e4m3(x):
    """Round float32 x (already within +-448) to the nearest-even e4m3 value, still as float32 (interpreter only)."""
    bits = x.to(tl.int32, bitcast=True)
    # normals: round the 23-bit mantissa to 3 bits, ties to even; an integer add carries into the exponent
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF).to(tl.float32, bitcast=True)
    # subnormals (|x| < 2**-6) sit on a fixed 2**-9 grid: adding 2**14 (float32 ulp 2**-9) rounds to it
    mag = tl.abs(x)
    sub = (mag + 16384.0) - 16384.0
    sub = tl.where(x < 0, -sub, sub)
    return tl.where(mag < 0.015625, sub, normal)
