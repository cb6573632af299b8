"""FP8 checkpoint formats: config.json's quantization_config, scale tensor names, scales to per-row form.

Formats read (facts from transformers' finegrained_fp8, vLLM's fp8 and compressed-tensors loaders):
- quant_method "fp8" (transformers' FineGrainedFP8Config, DeepSeek-V3 style, vLLM/AutoFP8 per-tensor):
  `weight_block_size` [bn, bk] -> `<module>.weight_scale_inv` float32 (or UE8M0) [ceil(out/bn), ceil(in/bk)];
  no block size -> a per-tensor scale, `weight_scale_inv` (transformers) or `weight_scale` (vLLM/AutoFP8).
  `activation_scheme` "static" adds `activation_scale` / `input_scale`.
- quant_method "compressed-tensors" with format "float-quantized" (RedHatAI/neuralmagic FP8 models): groups of
  8-bit float weights, strategy "tensor" (`weight_scale` [1]) or "channel" ([out, 1]) or "block"; input
  activations dynamic per token or static per tensor (`input_scale` [1]).
Every scale here multiplies: w = q * scale (the "_inv" in weight_scale_inv is historical).

Whatever the checkpoint holds becomes one canonical form, fp8 rows + a float32 scale per row, before any
fusing or sharding: per-tensor scales expand to rows exactly (so fused q/k/v or gate/up shards with
different per-tensor scales need no requantization), block scales are dequantized and requantized per row.
Static input scales are read and not used: activations are always quantized dynamically per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spool.engine.config import ConfigError
from spool.engine.quantization.fp8 import quantize_per_channel

WEIGHT_SCALE_NAMES = ("weight_scale", "weight_scale_inv")
INPUT_SCALE_NAMES = ("input_scale", "activation_scale")
SUPPORTED = ("fp8", "compressed-tensors (float-quantized, 8-bit float)")
_CT_FORMATS = ("float-quantized", "naive-quantized")


@dataclass(slots=True)
class CheckpointQuantization:
    """What a pre-quantized checkpoint's config.json says about its FP8 tensors."""

    quant_method: str  # "fp8" | "compressed-tensors"
    weight_block_size: tuple[int, int] | None  # None: per-tensor or per-channel scales
    static_activations: bool  # the checkpoint carries input scales (which spool does not use)


def parse_quantization_config(raw: dict | None) -> CheckpointQuantization | None:
    """config.json's quantization_config -> CheckpointQuantization, None for none, ConfigError if unsupported."""
    if not raw:
        return None
    method = str(raw.get("quant_method", "")).lower()
    if method == "fp8":
        return _parse_hf_fp8(raw)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(raw)
    raise ConfigError(
        f"checkpoint quantization {method or raw!r} is not supported; spool loads FP8 checkpoints "
        f"(quant_method {' or '.join(SUPPORTED)}) and quantizes bf16/fp32 checkpoints with quantization='fp8'"
    )


def _parse_hf_fp8(raw: dict) -> CheckpointQuantization:
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"fp8 checkpoint format fmt={fmt!r} is not supported; spool loads e4m3 weights")
    block = raw.get("weight_block_size")
    if block is not None and (len(block) != 2 or min(block) < 1):
        raise ConfigError(f"fp8 weight_block_size must be two positive sizes (got {block!r})")
    scheme = str(raw.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise ConfigError(f"fp8 activation_scheme {scheme!r} is not supported; expected dynamic or static")
    return CheckpointQuantization("fp8", tuple(block) if block else None, scheme == "static")


def _parse_compressed_tensors(raw: dict) -> CheckpointQuantization:
    groups = raw.get("config_groups") or {}
    if not groups:
        raise ConfigError("compressed-tensors checkpoint without config_groups: nothing says how weights are stored")
    blocks, static = set(), False
    for name, group in groups.items():
        fmt = group.get("format") or raw.get("format")
        weights = group.get("weights") or {}
        kind = f"{weights.get('num_bits')}-bit {weights.get('type')}"
        if fmt not in _CT_FORMATS or weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise ConfigError(
                f"compressed-tensors group {name!r} (format {fmt!r}, {kind} weights) is not supported; spool loads "
                f"format float-quantized with 8-bit float weights"
            )
        strategy = weights.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            raise ConfigError(f"compressed-tensors group {name!r}: weight strategy {strategy!r} is not supported; "
                              f"expected tensor, channel or block")
        if strategy == "block":
            blocks.add(tuple(weights.get("block_structure") or ()))
        acts = group.get("input_activations")
        if acts is not None:
            if acts.get("type") != "float" or acts.get("num_bits") != 8:
                raise ConfigError(f"compressed-tensors group {name!r}: {acts.get('num_bits')}-bit "
                                  f"{acts.get('type')} activations are not supported; expected 8-bit float")
            static = static or not acts.get("dynamic", False)
    if len(blocks) > 1 or any(len(b) != 2 for b in blocks):
        raise ConfigError(f"compressed-tensors block_structure must be one pair of sizes (got {sorted(blocks)})")
    return CheckpointQuantization("compressed-tensors", next(iter(blocks)) if blocks else None, static)


def resolve_quantization(requested: str | None, checkpoint: CheckpointQuantization | None) -> str | None:
    """The scheme the model's projections use: an FP8 checkpoint runs in fp8 whatever was asked (as in vLLM)."""
    if checkpoint is not None:
        return "fp8"
    return requested


def dequantize_checkpoint_weight(weight: torch.Tensor, scale: torch.Tensor,
                                 block_size: tuple[int, int] | None, name: str = "weight") -> torch.Tensor:
    """A checkpoint's fp8 weight [out, in] with its scale (tensor, channel or block) -> float32 [out, in]."""
    rows, cols = weight.shape
    scale = scale.to(torch.float32)
    w = weight.to(torch.float32)
    if scale.numel() == 1:
        return w * scale.reshape(())
    if scale.numel() == rows and scale.shape in ((rows,), (rows, 1)):
        return w * scale.reshape(rows, 1)
    if block_size is not None and scale.dim() == 2:
        block_rows, block_cols = block_size
        grid = (-(-rows // block_rows), -(-cols // block_cols))
        if tuple(scale.shape) == grid:
            # Expand each block's scale over its rows and columns; the last block may be partial.
            full = scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
            return w * full
    raise ConfigError(
        f"{name}: scale shape {tuple(scale.shape)} fits neither a per-tensor, per-channel ({rows}) nor a "
        f"block ({'no weight_block_size' if block_size is None else list(block_size)}) scale of a "
        f"{rows}x{cols} weight"
    )


def checkpoint_weight_to_rows(weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None,
                              name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's fp8 weight and scale -> (fp8 [out, in], float32 scale [out]), exact unless block-scaled."""
    rows = weight.shape[0]
    if weight.dtype == torch.float8_e4m3fn and (scale.numel() == 1 or scale.shape in ((rows,), (rows, 1))):
        # Per-tensor and per-channel scales are per-row scales already: copy the fp8 bytes, no rounding.
        return weight, scale.to(torch.float32).reshape(-1).expand(rows).contiguous()
    # Block scales vary along a row: dequantize and requantize per row (one more e4m3 rounding).
    return quantize_per_channel(dequantize_checkpoint_weight(weight, scale, block_size, name))
