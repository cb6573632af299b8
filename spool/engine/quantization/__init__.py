"""Weight quantization: which linear method a model's projections use (see spool/engine/models/linear.py)."""
from __future__ import annotations

from spool.engine.config import ModelConfig
from spool.engine.models.linear import UNQUANTIZED
from spool.engine.quantization.fp8 import Fp8LinearMethod

QUANTIZATIONS = ("fp8",)


def linear_method(cfg: ModelConfig):
    """The method for the decoder's projections (q/k/v, o, gate/up, down): plain or FP8 W8A8."""
    if cfg.quantization is None:
        return UNQUANTIZED
    if cfg.quantization == "fp8":
        return Fp8LinearMethod()
    raise ValueError(f"unknown quantization {cfg.quantization!r}")
