"""Build a decoder from a local Hugging Face directory: safetensors (single or sharded) or dummy weights.

Under tensor parallelism every rank builds only its shard of the model and reads only its slices of the
checkpoint (safetensors' get_slice: the bytes of other ranks' rows and columns are never read); the layers
say which slices are theirs (`shard_index`, spool/engine/models/parallel_linear.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from spool.engine.config import ConfigError, ModelConfig
from spool.engine.distributed import SINGLE, TPGroup
from spool.engine.models.linear import Linear
from spool.engine.models.llama import LlamaForCausalLM
from spool.engine.quantization.checkpoint_formats import (
    INPUT_SCALE_NAMES,
    WEIGHT_SCALE_NAMES,
    CheckpointQuantization,
    checkpoint_weight_to_rows,
    dequantize_checkpoint_weight,
    parse_quantization_config,
    resolve_quantization,
)
from spool.engine.quantization.fp8 import FP8_DTYPE, check_fp8_device, quantize_per_channel
from spool.kernels.ops import Ops

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
# FP8 layers hold a float32 scale per weight row, fused and sharded exactly like the weight's rows.
_FUSED.update({k + "_scale": (v + "_scale", shard)
               for k, (v, shard) in list(_FUSED.items()) if k.endswith("proj.weight")})
_RENAMED.update({k + "_scale": v + "_scale" for k, v in list(_RENAMED.items()) if k.endswith("proj.weight")})


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


# safetensors' dtype names -> torch
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class LazyTensor:
    """A checkpoint tensor not read yet: shape and dtype from the file's header; indexing reads only that slice."""

    __slots__ = ("_slice", "shape", "dtype")

    def __init__(self, safetensors_slice):
        self._slice = safetensors_slice
        self.shape = torch.Size(safetensors_slice.get_shape())
        self.dtype = _ST_DTYPES[safetensors_slice.get_dtype()]

    def dim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def element_size(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize

    def __getitem__(self, index) -> torch.Tensor:
        return self._slice[index]


def _checkpoint_tensors(path: Path, device: torch.device):
    """(name, LazyTensor) for every tensor of every safetensors file; indexing one reads only those bytes."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, LazyTensor(f.get_slice(name))


def _is_fp8_weight(tensor: torch.Tensor) -> bool:
    """An 8-bit float tensor (e4m3 in every format we load; others are dequantized and requantized)."""
    return tensor.dtype.is_floating_point and tensor.element_size() == 1


def _fp8_layer_weight(params: dict, name: str) -> bool:
    """Whether HF tensor `name` is the weight of one of the model's FP8 linear layers."""
    tgt = _target(name)
    return tgt is not None and tgt[0] in params and params[tgt[0]].dtype == FP8_DTYPE


def _materialize(tensor) -> torch.Tensor:
    """Read a LazyTensor whole: FP8 conversions need all of a weight (each rank then keeps its slice)."""
    return tensor[...] if isinstance(tensor, LazyTensor) else tensor


def _canonical_fp8_tensors(tensors: Iterable, params: dict, quant: CheckpointQuantization | None,
                           source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Pair FP8 weights with their scales and yield what the model holds, under HF names.

    FP8 layers get `<m>.weight` fp8 rows plus `<m>.weight_scale` float32 per row (high-precision weights of FP8
    layers, from a bf16 checkpoint or a module the checkpoint left unquantized, are quantized here); FP8 tensors
    of layers that are not FP8 (an lm_head, or the whole model when run unquantized) are dequantized.
    A weight and its scale may come in any order, even from different shards, so each waits for the other.
    """
    block = quant.weight_block_size if quant is not None else None
    waiting_weights: dict[str, torch.Tensor] = {}
    waiting_scales: dict[str, torch.Tensor] = {}
    static_scales = 0

    def convert(module: str, weight: torch.Tensor, scale: torch.Tensor):
        name = module + ".weight"
        if _fp8_layer_weight(params, name):
            rows, row_scale = checkpoint_weight_to_rows(_materialize(weight), _materialize(scale), block, name)
            return [(name, rows), (name + "_scale", row_scale)]
        return [(name, dequantize_checkpoint_weight(_materialize(weight), _materialize(scale), block, name))]

    for name, tensor in tensors:
        module, _, leaf = name.rpartition(".")
        if leaf in WEIGHT_SCALE_NAMES:
            if module in waiting_weights:
                yield from convert(module, waiting_weights.pop(module), tensor)
            else:
                waiting_scales[module] = tensor
        elif leaf in INPUT_SCALE_NAMES:
            static_scales += 1  # activations are quantized per token instead
        elif leaf == "weight" and _is_fp8_weight(tensor):
            if module in waiting_scales:
                yield from convert(module, tensor, waiting_scales.pop(module))
            else:
                waiting_weights[module] = tensor
        elif leaf == "weight" and tensor.dim() == 2 and _fp8_layer_weight(params, name):
            rows, row_scale = quantize_per_channel(_materialize(tensor))
            yield name, rows
            yield name + "_scale", row_scale
        else:
            yield name, tensor
    if waiting_weights or waiting_scales:
        lone = sorted(waiting_weights)[:3] + sorted(waiting_scales)[:3]
        raise ConfigError(f"{source}: fp8 weights and scales do not pair up (no partner for {lone})")
    if static_scales:
        log.info("%s: %d static activation scales ignored; activations are quantized per token", source,
                 static_scales)


def load_named_tensors(model: LlamaForCausalLM, tensors, dtype: torch.dtype, source: str = "checkpoint",
                       quant: CheckpointQuantization | None = None) -> LoadStats:
    """Copy HF-named tensors (torch tensors or LazyTensors) into this rank's parameters, reading only the
    rows/columns the rank holds; every parameter (and every part of a fused one) must be covered.

    Parameters keep their own dtype (`dtype` is the model's; FP8 layers hold fp8 weights and float32 scales).
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[tuple[str, int | None]] = set()
    stats = LoadStats()
    for name, src in _canonical_fp8_tensors(tensors, params, quant, source):
        tgt = _target(name)
        if tgt is None or tgt[0] not in params:
            if tgt is None and "rotary_emb" not in name:
                log.debug("ignoring checkpoint tensor %s", name)
            continue
        pname, shard = tgt
        owner, _, attr = pname.rpartition(".")
        layer = modules.get(owner)
        full_shape = tuple(src.shape)
        rows, index = slice(None), ()
        if hasattr(layer, "shard_index"):
            rows, index = layer.shard_index(attr, shard, full_shape)
        dst = params[pname].data[rows]
        tensor = src[index or ...]  # a LazyTensor reads only these bytes
        if dst.shape != tensor.shape:
            raise ConfigError(f"{name}: checkpoint shape {full_shape} gives {tuple(tensor.shape)} here, "
                              f"expected {tuple(dst.shape)}")
        dst.copy_(tensor.to(dst.dtype))
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


def load_weights(model: LlamaForCausalLM, path: Path, device: torch.device, dtype: torch.dtype,
                 quant: CheckpointQuantization | None = None) -> LoadStats:
    """Load a local safetensors checkpoint (single or sharded) into the model, on the device."""
    return load_named_tensors(model, _checkpoint_tensors(path, device), dtype, str(path), quant)


def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights for benchmarks without a checkpoint: small normal values, norms at 1.

    FP8 layers get the per-row quantization of the very weights an unquantized model draws from the same seed,
    so fp8 and bf16 dummy models compare like for like.
    """
    embed = model.embed_tokens.weight
    gen = torch.Generator(device=embed.device).manual_seed(seed + model.tp.rank)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith(".weight_scale"):
            continue  # written with its weight
        if p.dtype == FP8_DTYPE:
            full = torch.empty(p.shape, dtype=embed.dtype, device=p.device)
            full.normal_(0.0, 0.02, generator=gen)  # what an unquantized model draws here
            rows, row_scale = quantize_per_channel(full)
            p.data.copy_(rows)
            params[name + "_scale"].data.copy_(row_scale)
        elif p.dim() == 1 and not name.endswith("bias"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def build_model(
    cfg: ModelConfig, path: Path, ops: Ops, device: torch.device, dtype: torch.dtype, load_format: str, seed: int,
    quantization: str | None = None, tp: TPGroup = SINGLE,
) -> LlamaForCausalLM:
    """Allocate the decoder (this rank's shard of it) on the device in the target dtype, then fill its weights.

    `quantization` "fp8" runs the projections in FP8 (quantized at load from a bf16/fp32 checkpoint or dummy
    weights); a checkpoint whose config.json says it is FP8 runs in fp8 either way.
    """
    checkpoint_quant = parse_quantization_config(cfg.quantization_config)
    cfg = dataclasses.replace(cfg, quantization=resolve_quantization(quantization, checkpoint_quant))
    if cfg.quantization == "fp8":
        check_fp8_device(device)
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
        stats = load_weights(model, path, device, dtype, checkpoint_quant)
        if tp.world_size > 1:
            log.info("rank %d of %d read %.1f MiB of weights (%d tensors)", tp.rank, tp.world_size,
                     stats.bytes_read / 2**20, stats.tensors)
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.process_weights_after_loading(module)
    return model.eval()
