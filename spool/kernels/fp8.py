"""FP8 (e4m3) numerics shared by the kernels and their references: the KV cache and per-token activations.

A cache in torch.float8_e4m3fn stores x / scale, rounded to nearest-even and saturated to the e4m3 range
(+-448), NaN stored as 0 (so no cache row is ever NaN: spool.kernels.kv_layout); readers compute stored * scale.
One scale per layer for K and one for V (vLLM's convention: from the checkpoint when it has them, else 1.0).
Caches in other dtypes ignore the scales.

FP8 linear layers quantize their input per token (spool.kernels.reference.quantize_per_token_fp8): each row gets
scale = max(amax / 448, MIN_SCALE) and stores x / scale in e4m3.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# vLLM's floor for dynamic per-token scales: an all-zero row would otherwise divide by zero.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the fp8 KV cache dtype."""
    return dtype == FP8_DTYPE


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in float32, saturated to +-448, NaN as 0, rounded to e4m3 (the reference for the KV-write kernel)."""
    y = x.float() / scale
    return torch.where(y.isnan(), 0.0, y).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)

