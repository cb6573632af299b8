"""Per-layer FP8 KV cache scales read from a checkpoint, under the names vLLM accepts.

An fp8 cache stores k / k_scale and v / v_scale (spool.kernels.fp8). Checkpoints calibrated for an fp8 KV
cache carry one scalar per layer for K and for V; vLLM (model_loader.weight_utils.maybe_remap_kv_scale_name
and the Quark/ModelOpt/compressed-tensors loaders) reads them under these names, relative to
`model.layers.N.self_attn.`:

  k_scale / v_scale                 HF, compressed-tensors (RedHatAI "FP8-KV" models), vLLM's own exports
  attn.k_scale / attn.v_scale       vLLM's internal parameter names
  k_proj.k_scale / v_proj.v_scale   NVIDIA ModelOpt
  k_proj.output_scale / v_proj.output_scale   AMD Quark
  kv_scale                          the deprecated single scale, used for both K and V

A layer without a scale (or with a non-positive one, a "not calibrated" placeholder) gets 1.0, as vLLM
does: values then go into e4m3 unscaled, which covers |x| <= 448. Only per-tensor scales are supported.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from safetensors import safe_open

from spool.engine.config import ConfigError
from spool.engine.models.loader import safetensors_files

log = logging.getLogger(__name__)

_SCALE_NAME = re.compile(
    r"^model\.layers\.(\d+)\.self_attn\."
    r"(k_scale|v_scale|attn\.k_scale|attn\.v_scale|k_proj\.k_scale|v_proj\.v_scale"
    r"|k_proj\.output_scale|v_proj\.output_scale|kv_scale)$"
)


def _which(suffix: str) -> str:
    """'k', 'v' or 'kv' for a matched scale suffix."""
    if suffix == "kv_scale":
        return "kv"
    return "k" if suffix.startswith(("k_", "attn.k_")) else "v"


def read_kv_scales(path: Path, num_layers: int) -> list[tuple[float, float]]:
    """(k_scale, v_scale) for each layer: the checkpoint's when present and positive, else 1.0."""
    found: dict[tuple[int, str], float] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                match = _SCALE_NAME.match(name)
                if match is None:
                    continue
                tensor = f.get_tensor(name)
                if tensor.numel() != 1:
                    raise ConfigError(f"{name}: only per-tensor KV cache scales are supported "
                                      f"(got shape {tuple(tensor.shape)})")
                layer, which = int(match.group(1)), _which(match.group(2))
                if layer >= num_layers:
                    raise ConfigError(f"{name}: layer {layer} past the model's {num_layers} layers")
                found[(layer, which)] = float(tensor.float().item())
    scales = []
    for layer in range(num_layers):
        legacy = found.get((layer, "kv"), 1.0)
        k = found.get((layer, "k"), legacy)
        v = found.get((layer, "v"), legacy)
        scales.append((k if k > 0 else 1.0, v if v > 0 else 1.0))
    read = sum(1 for key in found if found[key] > 0)
    if read:
        log.info("fp8 KV cache: %d k/v scales read from %s", read, path)
    else:
        log.warning("fp8 KV cache: %s has no k/v scales; using 1.0 (values must stay within +-448)", path)
    return scales
