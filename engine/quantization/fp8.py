"""FP8 (e4m3) W8A8 linear layers: per-output-channel weight scales, dynamic per-token activation scales.

Storage: the weight is float8_e4m3fn [out, in] with a float32 scale per output row, so w ~= q * scale[:, None].
Forward: each token's activations get their own scale (amax of the row / 448, computed on the fly), then
torch._scaled_mm multiplies the two fp8 operands with fp32 accumulation and applies both scales in its
epilogue (Hopper's FP8 tensor cores; Ada, compute capability 8.9, also has them). The reference
(`fp8_linear_reference`) dequantizes both operands and multiplies in float32; CPU runs use torch._scaled_mm
when the CPU build has it (torch >= 2.5 does), the reference otherwise.
"""
from __future__ import annotations

import functools

import torch

from engine.config import ConfigError
from engine.models.linear import empty_param

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# vLLM's floor for dynamic scales: an all-zero row would otherwise divide by zero.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
FP8_MIN_CAPABILITY = (8, 9)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (fp8 [out, in], float32 scale [out]) with w ~= q * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp_(min=MIN_SCALE)  # [out]
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, in] -> (fp8 [T, in], float32 scale [T, 1]): one scale per token, amax / 448."""
    # The inf-norm is max |x| in one pass without an |x| temporary, exact in x's own dtype.
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)  # [T, 1]
    scale = (amax.float() / FP8_MAX).clamp_(min=MIN_SCALE)  # [T, 1]
    # No clamp needed: scale >= amax / 448, so |x / scale| <= 448 (+1 fp32 ulp, which rounds to 448).
    # These passes over x (inf-norm, divide, cast) are the cost a fused quantize kernel would cut.
    q = (x / scale).to(FP8_DTYPE)  # x / fp32 scale -> fp32 temporary -> e4m3
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 [rows, cols] with float32 scale [rows] or [rows, 1] -> float32 [rows, cols]."""
    return q.float() * scale.reshape(-1, 1).float()


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the FP8 matmul computes, in float32: per-token quantized x times the dequantized weight (+ bias)."""
    x_q, x_scale = quantize_per_token(x)
    out = dequantize_rows(x_q, x_scale) @ dequantize_rows(weight, weight_scale).t()  # [T, out]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@functools.cache
def cpu_has_scaled_mm() -> bool:
    """Whether this torch build runs row-wise scaled torch._scaled_mm on the CPU."""
    # Row-wise scales (one per row of a, one per column of b): some CPU builds take only per-tensor scales.
    a = torch.ones(2, 16, dtype=FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] (model dtype) @ fp8 weight [out, in] with scales [out] -> [T, out] in x's dtype."""
    if not x.is_cuda and not cpu_has_scaled_mm():
        return fp8_linear_reference(x, weight, weight_scale, bias)
    x_q, x_scale = quantize_per_token(x.reshape(-1, x.shape[-1]))  # [T, in] fp8, [T, 1] fp32
    # bf16 is the one output every torch release's row-wise CUDA path takes; the CPU kernel writes any float.
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
    # weight.t() is the column-major [in, out] operand _scaled_mm wants; no copy.
    out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                           out_dtype=out_dtype)  # [T, out]
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if bias is not None:
        out = out + bias  # separate add: row-wise _scaled_mm's fused bias support varies across torch releases
    return out


def check_fp8_device(device: torch.device) -> None:
    """Raise ConfigError when `device` is a GPU without FP8 tensor cores (compute capability < 8.9)."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    check_fp8_capability(capability, name)
    # The card has FP8 tensor cores; make sure this torch build's row-wise scaled matmul runs on it too.
    a = torch.ones(16, 16, dtype=FP8_DTYPE, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"quantization='fp8': torch {torch.__version__} cannot run row-wise scaled FP8 matmuls "
                          f"on {name}: {first}") from None


def check_fp8_capability(capability: tuple[int, int], name: str) -> None:
    """The check itself, apart from torch.cuda so tests can ask about any card."""
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise ConfigError(
            f"quantization='fp8' needs a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or "
            f"newer); {name} has {capability[0]}.{capability[1]}"
        )


class Fp8LinearMethod:
    """W8A8 FP8 linear: fp8 weight [out, in] + float32 per-row scale; activations quantized per token.

    The loader writes the weight and its per-row scale already in this form (see
    engine/quantization/checkpoint_formats.py), whatever the checkpoint stored. Every shape is taken from the
    tensors (or from the sizes a wrapping method passes to create_weights), so a tensor-parallel method can
    allocate a shard of rows or columns through this one and slice weight and weight_scale like weight and bias.
    """

    def create_weights(self, layer, out_features: int | None = None, in_features: int | None = None) -> None:
        """Register the fp8 weight [out, in] and its float32 scale [out] (sizes default to the layer's)."""
        out_features = layer.out_features if out_features is None else out_features
        in_features = layer.in_features if in_features is None else in_features
        layer.weight = empty_param(out_features, in_features, dtype=FP8_DTYPE)
        layer.weight_scale = empty_param(out_features, dtype=torch.float32)

    def process_weights_after_loading(self, layer) -> None:
        """Refuse what would fail later: non-finite scales, or shapes torch._scaled_mm cannot take on CUDA."""
        shape = tuple(layer.weight.shape)
        if not bool(torch.isfinite(layer.weight_scale).all()):
            raise ConfigError(f"non-finite fp8 weight scales in a {shape[0]}x{shape[1]} layer")
        if layer.weight.is_cuda and (shape[0] % 16 or shape[1] % 16):
            raise ConfigError(f"quantization='fp8' needs layer sizes divisible by 16 on CUDA (a layer is "
                              f"{shape[0]}x{shape[1]})")

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] -> [T, out] in x's dtype."""
        return fp8_linear(x, layer.weight, layer.weight_scale, bias)
