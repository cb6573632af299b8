"""FP8 (e4m3) KV cache numerics shared by the kernels and their references.

A cache in torch.float8_e4m3fn stores x / scale, rounded to nearest-even and saturated to the e4m3 range
(+-448); readers compute stored * scale. One scale per layer for K and one for V (vLLM's convention:
from the checkpoint when it has them, else 1.0). Caches in other dtypes ignore the scales.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the fp8 KV cache dtype."""
    return dtype == FP8_DTYPE


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in float32, saturated to +-448, rounded to e4m3 (the reference for the KV-write kernel)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)

