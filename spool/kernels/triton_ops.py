"""The Triton backend: spool.kernels.reference's op set as Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

from spool.kernels.activation import silu_and_mul, silu_and_mul_quant
from spool.kernels.kv_cache import write_kv_cache
from spool.kernels.ops import Ops
from spool.kernels.paged_attention import paged_attention
from spool.kernels.qk_norm_rotary import qk_norm_rotary
from spool.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_quant, rms_norm, rms_norm_quant
from spool.kernels.rotary import rotary_embedding

TRITON_OPS = Ops(
    name="triton",
    rms_norm=rms_norm,
    fused_add_rms_norm=fused_add_rms_norm,
    silu_and_mul=silu_and_mul,
    rms_norm_quant=rms_norm_quant,
    fused_add_rms_norm_quant=fused_add_rms_norm_quant,
    silu_and_mul_quant=silu_and_mul_quant,
    rotary_embedding=rotary_embedding,
    qk_norm_rotary=qk_norm_rotary,
    write_kv_cache=write_kv_cache,
    paged_attention=paged_attention,
)
