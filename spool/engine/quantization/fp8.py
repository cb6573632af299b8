"""FP8 (e4m3) W8A8 linear layers: per-output-channel weight scales, dynamic per-token activation scales.

Storage: the weight is float8_e4m3fn [out, in] with a float32 scale per output row, so w ~= q * scale[:, None].
Forward: each token's activations get their own scale (amax of the row / 448, computed on the fly), then
torch._scaled_mm multiplies the two fp8 operands with fp32 accumulation and applies both scales in its
epilogue (Hopper's FP8 tensor cores; Ada, compute capability 8.9, also has them). The reference
(`fp8_linear_reference`) dequantizes both operands and multiplies in float32; CPU runs use torch._scaled_mm
when the CPU build has it (torch >= 2.5 does), the reference otherwise.

The activation quantization's numerics are spool.kernels.reference.quantize_per_token_fp8 (`quantize_per_token`
here). On CUDA it runs as one Triton kernel (spool.kernels.fp8_quant, bit-identical to the reference); and the
decoder can hand `apply` an activation already quantized by its producer (the fused RMSNorm or SiLU-and-mul
*_quant ops, same numerics) as a (q, scale) pair, which skips the quantization here altogether.
"""
from __future__ import annotations

import functools

import torch

from spool.engine.config import ConfigError
from spool.engine.models.linear import empty_param
from spool.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE
from spool.kernels.reference import quantize_per_token_fp8 as quantize_per_token

FP8_MIN_CAPABILITY = (8, 9)
# An FP8 layer's input: the activation [T, in] in the model dtype, or its per-token quantization (q, scale).
Fp8Input = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (fp8 [out, in], float32 scale [out]) with w ~= q * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp_(min=MIN_SCALE)  # [out]
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 [rows, cols] with float32 scale [rows] or [rows, 1] -> float32 [rows, cols]."""
    return q.float() * scale.reshape(-1, 1).float()


def _fp8_rows(x: Fp8Input, out_dtype: torch.dtype | None, quantize) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(q [T, in] fp8, scale [T, 1] float32, output dtype) of a layer input: a tensor is quantized with `quantize`
    (and sets the output dtype unless out_dtype does), a (q, scale) pair is taken as it is (out_dtype required)."""
    if isinstance(x, torch.Tensor):
        x_q, x_scale = quantize(x.reshape(-1, x.shape[-1]))
        return x_q, x_scale, x.dtype if out_dtype is None else out_dtype
    x_q, x_scale = x
    if x_q.dtype != FP8_DTYPE or out_dtype is None:
        raise ValueError(f"fp8_linear: a pre-quantized input must be (float8_e4m3fn, scale) with out_dtype set, "
                         f"got {x_q.dtype} and out_dtype={out_dtype}")
    return x_q.reshape(-1, x_q.shape[-1]), x_scale.reshape(-1, 1), out_dtype


def fp8_linear_reference(x: Fp8Input, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What the FP8 matmul computes, in float32: per-token quantized x times the dequantized weight (+ bias)."""
    x_q, x_scale, out_dtype = _fp8_rows(x, out_dtype, quantize_per_token)
    out = dequantize_rows(x_q, x_scale) @ dequantize_rows(weight, weight_scale).t()  # [T, out]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@functools.cache
def _cuda_quantizer():
    """The Triton per-token quantizer (imported on first CUDA use: CPU runs never compile a kernel)."""
    from spool.kernels.fp8_quant import quantize_per_token_fp8

    return quantize_per_token_fp8


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


def fp8_linear(x: Fp8Input, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [T, in] (model dtype) or its (fp8 [T, in], scale [T, 1]) @ fp8 weight [out, in] with scales [out] ->
    [T, out] in out_dtype (default: x's dtype; required for a pair)."""
    on_cuda = (x if isinstance(x, torch.Tensor) else x[0]).is_cuda
    if not on_cuda and not cpu_has_scaled_mm():
        return fp8_linear_reference(x, weight, weight_scale, bias, out_dtype)
    quantize = _cuda_quantizer() if on_cuda else quantize_per_token
    x_q, x_scale, out_dtype = _fp8_rows(x, out_dtype, quantize)  # [T, in] fp8, [T, 1] fp32
    # bf16 is the one output every torch release's row-wise CUDA path takes; the CPU kernel writes any float.
    mm_dtype = torch.bfloat16 if on_cuda else out_dtype
    # weight.t() is the column-major [in, out] operand _scaled_mm wants; no copy.
    out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                           out_dtype=mm_dtype)  # [T, out]
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
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
    spool/engine/quantization/checkpoint_formats.py), whatever the checkpoint stored. Every shape is taken from the
    tensors (or from the sizes a wrapping method passes to create_weights), so a tensor-parallel method can
    allocate a shard of rows or columns through this one and slice weight and weight_scale like weight and bias.
    """

    takes_fp8_input = True  # apply() also takes the input already quantized per token by its producer

    def create_weights(self, layer, out_features: int | None = None, in_features: int | None = None) -> None:
        """Register the fp8 weight [out, in] and its float32 scale [out] (sizes default to the layer's)."""
        out_features = layer.out_features if out_features is None else out_features
        in_features = layer.in_features if in_features is None else in_features
        layer.weight = empty_param(out_features, in_features, dtype=FP8_DTYPE)
        layer.weight_scale = empty_param(out_features, dtype=torch.float32)
        # The model dtype (the default dtype while the model is built, as for every unquantized parameter):
        # what apply() returns for a pre-quantized (q, scale) input, which carries no dtype of its own.
        layer.activation_dtype = torch.get_default_dtype()

    def process_weights_after_loading(self, layer) -> None:
        """Refuse what would fail later: non-finite scales, or shapes torch._scaled_mm cannot take on CUDA."""
        shape = tuple(layer.weight.shape)
        if not bool(torch.isfinite(layer.weight_scale).all()):
            raise ConfigError(f"non-finite fp8 weight scales in a {shape[0]}x{shape[1]} layer")
        if layer.weight.is_cuda and (shape[0] % 16 or shape[1] % 16):
            raise ConfigError(f"quantization='fp8' needs layer sizes divisible by 16 on CUDA (a layer is "
                              f"{shape[0]}x{shape[1]})")

    def apply(self, layer, x: Fp8Input, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] -> [T, out] in x's dtype; a (fp8 [T, in], scale [T, 1]) pair -> [T, out] in the model dtype."""
        out_dtype = None if isinstance(x, torch.Tensor) else layer.activation_dtype
        return fp8_linear(x, layer.weight, layer.weight_scale, bias, out_dtype)
