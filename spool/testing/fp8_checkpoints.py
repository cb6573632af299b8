"""Tiny FP8 checkpoints in the formats published on the Hub, written from a tiny fp32 model (tiny_model.py).

Formats (config.json quantization_config + tensor names, as their producers write them):
- "hf-block": transformers FineGrainedFP8 / DeepSeek-V3: quant_method "fp8", weight_block_size [bn, bk],
  `weight_scale_inv` float32 [ceil(out/bn), ceil(in/bk)].
- "hf-tensor": transformers FineGrainedFP8 without blocks: `weight_scale_inv` float32 scalar.
- "autofp8": vLLM/AutoFP8 per-tensor with static activations: `weight_scale` and `input_scale` scalars.
- "ct-channel": compressed-tensors float-quantized, channel weights ([out, 1] bf16 scales), dynamic per-token
  activations, one layer's down_proj left unquantized through `ignore` (as llm-compressor recipes can).
- "ct-tensor": compressed-tensors float-quantized, tensor weights ([1] scales), static tensor activations.
The quantization here is written out plainly (loops over blocks) so tests check the loader against it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FORMATS = ("hf-block", "hf-tensor", "autofp8", "ct-channel", "ct-tensor")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CT_IGNORED = "model.layers.1.mlp.down_proj"


def is_projection(name: str) -> bool:
    """Whether `name` is the weight of a decoder projection (what FP8 checkpoints quantize)."""
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[-1] == "weight" and parts[-2] in PROJECTIONS


def quantize_tensor(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale, saturated to e4m3's range, rounded to e4m3."""
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise: one scale per [bn, bk] tile (the last ones partial) -> (fp8 [out, in], scale grid)."""
    rows, cols = w.shape
    bn, bk = block
    grid = torch.empty(-(-rows // bn), -(-cols // bk))
    q = torch.empty(rows, cols, dtype=FP8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            tile = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            grid[i, j] = tile.abs().max() / FP8_MAX
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = quantize_tensor(tile, grid[i, j])
    return q, grid


def _quantize(name: str, w: torch.Tensor, fmt: str, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    module = name[: -len(".weight")]
    if fmt == "hf-block":
        q, grid = quantize_blocks(w, block)
        return {name: q, module + ".weight_scale_inv": grid}
    if fmt in ("hf-tensor", "autofp8", "ct-tensor"):
        scale = w.abs().max().float() / FP8_MAX
        if fmt == "ct-tensor":
            scale = scale.to(torch.bfloat16).float().reshape(1)  # compressed-tensors keeps scales in bf16
        out = {name: quantize_tensor(w, scale)}
        if fmt == "hf-tensor":
            out[module + ".weight_scale_inv"] = scale
        elif fmt == "autofp8":
            out[module + ".weight_scale"] = scale
            out[module + ".input_scale"] = torch.tensor(0.05)  # a calibrated static scale, unused by spool
        else:
            out[module + ".weight_scale"] = scale.to(torch.bfloat16)
            out[module + ".input_scale"] = torch.tensor([0.05], dtype=torch.bfloat16)
        return out
    if fmt == "ct-channel":
        scale = (w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).to(torch.bfloat16)  # [out, 1]
        return {name: quantize_tensor(w, scale.float()), module + ".weight_scale": scale}
    raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")


def quantization_config(fmt: str, block: tuple[int, int]) -> dict:
    """The config.json quantization_config each format's producer writes."""
    if fmt == "hf-block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(block),
                "modules_to_not_convert": None}
    if fmt == "hf-tensor":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None}
    if fmt == "autofp8":
        return {"quant_method": "fp8", "activation_scheme": "static"}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
               "strategy": "channel" if fmt == "ct-channel" else "tensor"}
    acts = ({"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}
            if fmt == "ct-channel" else
            {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"})
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ["lm_head"] + (["re:.*layers.1.mlp.down_proj"] if fmt == "ct-channel" else [])}


def write_fp8_checkpoint(src: str | Path, dst: str | Path, fmt: str, block: tuple[int, int] = (128, 128)) -> Path:
    """Copy the tiny model at `src` to `dst` with its projections quantized in format `fmt`."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        if is_projection(name) and not (fmt == "ct-channel" and name.startswith(CT_IGNORED + ".")):
            out.update(_quantize(name, tensor, fmt, block))
        else:
            out[name] = tensor
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(fmt, block)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
