"""Build a decoder from a local Hugging Face directory: safetensors (single or sharded) or dummy weights.

Under tensor parallelism every rank builds only its shard of the model and reads only its slices of the
checkpoint (safetensors' get_slice: the bytes of other ranks' rows and columns are never read); the layers
say which slices are theirs (`shard_index`, engine/models/parallel_linear.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ConfigError, ModelConfig
from engine.distributed import SINGLE, TPGroup
from engine.models.linear import Linear
from engine.models.llama import LlamaForCausalLM
from kernels.ops import Ops

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# HF parameter suffix -> (our parameter path suffix, shard index within a fused tensor or None)
_FUSED = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
    "self_attn.q_proj.bias": ("self_attn.qkv_proj.bias", 0),
    "self_attn.k_proj.bias": ("self_attn.qkv_proj.bias", 1),
    "self_attn.v_proj.bias": ("self_attn.qkv_proj.bias", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}
_RENAMED = {
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "self_attn.o_proj.bias": "self_attn.o_proj.bias",
    "self_attn.q_norm.weight": "self_attn.q_norm",
    "self_attn.k_norm.weight": "self_attn.k_norm",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "input_layernorm.weight": "input_layernorm",
    "post_attention_layernorm.weight": "post_attention_layernorm",
}


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's weight files; an index's missing shard is named in the error."""
    index = path / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ConfigError(f"{path} is incomplete: shard(s) {missing} listed in {INDEX_FILE} are missing")
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise ConfigError(f"{path} has no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


def _target(name: str) -> tuple[str, int | None] | None:
    """Map an HF tensor name to (our parameter name, fused shard) or None for tensors we don't use."""
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        if rest in _FUSED:
            tgt, shard = _FUSED[rest]
            return f"layers.{idx}.{tgt}", shard
        if rest in _RENAMED:
            return f"layers.{idx}.{_RENAMED[rest]}", None
        return None
    simple = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm",
              "lm_head.weight": "lm_head.weight"}
    return (simple[name], None) if name in simple else None


@dataclass(slots=True)
class LoadStats:
    """What loading read: per rank, about 1/tensor_parallel_size of the checkpoint plus replicated tensors."""

    tensors: int = 0
    bytes_read: int = 0


def _checkpoint_tensors(path: Path, device: torch.device):
    """(name, lazy slice) for every tensor of every safetensors file; indexing a slice reads only its bytes."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def _shape(source) -> tuple[int, ...]:
    """Shape of a tensor or of a safetensors slice, without reading it."""
    return tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)


def load_named_tensors(
    model: LlamaForCausalLM, tensors, dtype: torch.dtype, source: str = "checkpoint"
) -> LoadStats:
    """Copy HF-named tensors (torch tensors or safetensors slices) into this rank's parameters, reading only
    the rows/columns the rank holds; every parameter (and every part of a fused one) must be covered."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[tuple[str, int | None]] = set()
    stats = LoadStats()
    for name, src in tensors:
        tgt = _target(name)
        if tgt is None or tgt[0] not in params:
            if tgt is None and "rotary_emb" not in name:
                log.debug("ignoring checkpoint tensor %s", name)
            continue
        pname, shard = tgt
        owner, _, attr = pname.rpartition(".")
        layer = modules.get(owner)
        full_shape = _shape(src)
        rows, index = slice(None), ()
        if hasattr(layer, "shard_index"):
            rows, index = layer.shard_index(attr, shard, full_shape)
        dst = params[pname].data[rows]
        tensor = src[index or ...]  # a safetensors slice reads only these bytes
        if dst.shape != tensor.shape:
            raise ConfigError(f"{name}: checkpoint shape {full_shape} gives {tuple(tensor.shape)} here, "
                              f"expected {tuple(dst.shape)}")
        dst.copy_(tensor.to(dtype))
        stats.tensors += 1
        stats.bytes_read += tensor.numel() * tensor.element_size()
        loaded.add(tgt)
    expected = set()
    for pname in params:
        if ".qkv_proj." in pname:
            expected |= {(pname, 0), (pname, 1), (pname, 2)}
        elif ".gate_up_proj." in pname:
            expected |= {(pname, 0), (pname, 1)}
        else:
            expected.add((pname, None))
    missing = sorted(p for p, _ in expected - loaded)
    if missing:
        raise ConfigError(f"{source}: lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return stats


def load_weights(model: LlamaForCausalLM, path: Path, device: torch.device, dtype: torch.dtype) -> LoadStats:
    """Load a local safetensors checkpoint (single or sharded) into the model, on the device."""
    return load_named_tensors(model, _checkpoint_tensors(path, device), dtype, str(path))


def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights for benchmarks without a checkpoint: small normal values, norms at 1."""
    gen = torch.Generator(device=model.norm.device).manual_seed(seed + model.tp.rank)
    for name, p in model.named_parameters():
        if p.dim() == 1 and not name.endswith("bias"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def build_model(
    cfg: ModelConfig, path: Path, ops: Ops, device: torch.device, dtype: torch.dtype, load_format: str, seed: int,
    tp: TPGroup = SINGLE,
) -> LlamaForCausalLM:
    """Allocate the decoder (this rank's shard of it) on the device in the target dtype, then fill its weights."""
    if load_format != "dummy":
        safetensors_files(path)  # fail fast, before allocating, on an incomplete directory
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg, ops, tp)
    finally:
        torch.set_default_dtype(prev)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        stats = load_weights(model, path, device, dtype)
        if tp.world_size > 1:
            log.info("rank %d of %d read %.1f MiB of weights (%d tensors)", tp.rank, tp.world_size,
                     stats.bytes_read / 2**20, stats.tensors)
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.process_weights_after_loading(module)
    return model.eval()
