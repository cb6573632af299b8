"""Projections whose weight layout and matmul belong to a pluggable method.

`Linear` is the one place a decoder multiplies by a weight matrix. Its `method` decides which parameters the
layer holds and how `forward` computes: `UnquantizedLinearMethod` keeps a [out, in] weight in the model dtype and
calls F.linear. Quantized methods (FP8) and tensor-parallel shards plug in here without touching model code,
as vLLM's LinearBase/quant_method do. The loader writes checkpoint tensors into the layer's parameters by name
(`weight`, `bias`, plus whatever the method creates) and then calls `process_weights_after_loading`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def empty_param(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    """A frozen parameter to be filled by the loader (default dtype and device unless given)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class UnquantizedLinearMethod:
    """Weights in the model dtype: y = x W^T + b."""

    takes_fp8_input = False  # see Linear.takes_fp8_input

    def create_weights(self, layer: "Linear") -> None:
        """Register the [out, in] weight on the layer."""
        layer.weight = empty_param(layer.out_features, layer.in_features)

    def process_weights_after_loading(self, layer: "Linear") -> None:
        """Nothing to convert for plain weights."""

    def apply(self, layer: "Linear", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        return F.linear(x, layer.weight, bias)


UNQUANTIZED = UnquantizedLinearMethod()


class Linear(nn.Module):
    """y = x W^T (+ b), with W's storage and the matmul chosen by `method`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, method=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method if method is not None else UNQUANTIZED
        self.method.create_weights(self)
        self.bias = empty_param(out_features) if bias else None

    @property
    def takes_fp8_input(self) -> bool:
        """Whether forward also takes its input already quantized per token, (fp8 [T, in], float32 scale [T, 1]),
        as the *_quant ops of spool.kernels.ops return it (FP8 methods): the producer can then fuse the quantization."""
        return self.method.takes_fp8_input

    def forward(self, x):
        """x [T, in] (or, when takes_fp8_input, its (q, scale) pair) -> [T, out]."""
        return self.method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, " \
               f"method={type(self.method).__name__}"
