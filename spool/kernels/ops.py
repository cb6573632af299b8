"""The op set model code calls: one interface, a PyTorch reference backend and a Triton backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from spool.kernels import reference


@dataclass(frozen=True, slots=True)
class Ops:
    """A backend: the functions the decoder layers use, all with spool.kernels.reference's signatures.

    The *_quant ops return their plain op's output per-token quantized to FP8, (q, scale): the decoder calls
    them in place of the plain op when the consuming projection takes FP8 input (quantization="fp8").
    """

    name: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    silu_and_mul: Callable
    rms_norm_quant: Callable
    fused_add_rms_norm_quant: Callable
    silu_and_mul_quant: Callable
    rotary_embedding: Callable
    qk_norm_rotary: Callable
    write_kv_cache: Callable
    paged_attention: Callable


TORCH_OPS = Ops(
    name="torch",
    rms_norm=reference.rms_norm,
    fused_add_rms_norm=reference.fused_add_rms_norm,
    silu_and_mul=reference.silu_and_mul,
    rms_norm_quant=reference.rms_norm_quant,
    fused_add_rms_norm_quant=reference.fused_add_rms_norm_quant,
    silu_and_mul_quant=reference.silu_and_mul_quant,
    rotary_embedding=reference.rotary_embedding,
    qk_norm_rotary=reference.qk_norm_rotary,
    write_kv_cache=reference.write_kv_cache,
    paged_attention=reference.paged_attention,
)


def get_ops(name: str, device: torch.device | str) -> Ops:
    """Pick a backend by name: 'torch', 'triton', or 'auto' (Triton on CUDA, torch elsewhere)."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TORCH_OPS
    if name == "triton":
        from spool.kernels.triton_ops import TRITON_OPS

        return TRITON_OPS
    raise ValueError(f"unknown kernel backend {name!r}; expected 'auto', 'torch' or 'triton'")
