"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3) over the flat varlen batch and paged KV cache.

Model code sees only AttentionMetadata and KV tensors, never requests. Every op that has a kernel goes
through `ops` (spool.kernels.ops.Ops), so the CPU reference and the Triton backend run the same model code.

FP8 projections (quantization="fp8") take their input quantized per token; where the producer is one of our
ops (the input and post-attention RMSNorms for qkv_proj and gate_up_proj, SiLU-and-mul for down_proj), the
decoder calls its *_quant variant, which emits (fp8, scale) in the same kernel. o_proj's input comes from
attention and is quantized inside the projection.
"""
from __future__ import annotations

import torch
from torch import nn

from spool.engine.attention import AttentionMetadata
from spool.engine.config import ModelConfig
from spool.engine.distributed import SINGLE, TPGroup
from spool.engine.models.linear import empty_param
from spool.engine.models.parallel_linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from spool.engine.quantization import linear_method
from spool.kernels.ops import Ops


class Attention(nn.Module):
    """Fused-QKV attention with rotary positions, optional q/k RMSNorm (Qwen3) and paged KV.

    Under tensor parallelism this rank computes its own heads (and holds only their KV cache); o_proj sums
    the ranks' partial outputs.
    """

    def __init__(self, cfg: ModelConfig, ops: Ops, tp: TPGroup = SINGLE):
        super().__init__()
        self.ops = ops
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.qkv_bias, tp=tp, method=linear_method(cfg))
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        # fp8 KV cache: the cache holds k / k_scale and v / v_scale (set by the ModelRunner; ignored otherwise)
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.eps = cfg.rms_norm_eps
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias, tp=tp,
                                        method=linear_method(cfg))
        self.q_norm = empty_param(self.head_dim) if cfg.qk_norm else None
        self.k_norm = empty_param(self.head_dim) if cfg.qk_norm else None

    def project(
        self,
        x,  # [T, hidden], or its (fp8 [T, hidden], scale [T, 1]) when qkv_proj.takes_fp8_input
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything before attention reads the cache: the qkv projection, rotary (after the q/k norms), and the
        write of k and v into the paged cache. Returns q [T, Hq, D], k and v [T, Hk, D]."""
        qkv = self.qkv_proj(x)  # [T, (Hq + 2Hk) * D]
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm of q and k, then rotary, in one kernel
            q, k = self.ops.qk_norm_rotary(positions, q, k, self.q_norm, self.k_norm, self.eps, cos_sin)
        else:
            q, k = self.ops.rotary_embedding(positions, q, k, cos_sin)
        k_cache, v_cache = kv
        self.ops.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, self.k_scale, self.v_scale)
        return q, k, v

    def attend(
        self, q, k, v, meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Paged attention of q over each sequence's cached context: [T, Hq, D] (into out when given)."""
        k_cache, v_cache = kv
        return self.ops.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, self.scale,
            max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, k_scale=self.k_scale, v_scale=self.v_scale,
            k_new=k, v_new=v,  # prompt steps read their own keys contiguously (unquantized with an fp8 cache)
            out=out,
        )

    def forward(
        self,
        x,  # [T, hidden], or its (fp8 [T, hidden], scale [T, 1]) when qkv_proj.takes_fp8_input
        meta: AttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],
        cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = self.project(x, meta.positions, meta.slot_mapping, kv, cos_sin)
        o = self.attend(q, k, v, meta, kv)  # [T, Hq, D]
        return self.o_proj(o.reshape(o.shape[0], self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection."""

    def __init__(self, cfg: ModelConfig, ops: Ops, tp: TPGroup = SINGLE):
        super().__init__()
        self.ops = ops
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], tp=tp,
                                                       method=linear_method(cfg))
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, tp=tp, method=linear_method(cfg))

    def forward(self, x) -> torch.Tensor:
        """x [T, hidden] (or its fp8 pair, see Attention.forward) -> [T, hidden]."""
        act = self.ops.silu_and_mul_quant if self.down_proj.takes_fp8_input else self.ops.silu_and_mul
        return self.down_proj(act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP, with the residual carried through fused add+RMSNorm."""

    def __init__(self, cfg: ModelConfig, ops: Ops, tp: TPGroup = SINGLE):
        super().__init__()
        self.ops = ops
        self.eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg, ops, tp)
        self.mlp = MLP(cfg, ops, tp)
        self.input_layernorm = empty_param(cfg.hidden_size)
        self.post_attention_layernorm = empty_param(cfg.hidden_size)

    def attn_in(self, x, residual, positions, slot_mapping, kv, cos_sin):
        """The layer up to attention: the input norm (adding the residual) and self_attn.project.
        Returns (q, k, v, residual); residual None means x is the embedding (the first layer)."""
        # Each norm's output feeds one projection: quantized in the norm's kernel when that projection takes fp8.
        fp8_qkv = self.self_attn.qkv_proj.takes_fp8_input
        if residual is None:
            residual = x
            h = (self.ops.rms_norm_quant if fp8_qkv else self.ops.rms_norm)(x, self.input_layernorm, self.eps)
        else:
            add_norm = self.ops.fused_add_rms_norm_quant if fp8_qkv else self.ops.fused_add_rms_norm
            h, residual = add_norm(x, residual, self.input_layernorm, self.eps)
        q, k, v = self.self_attn.project(h, positions, slot_mapping, kv, cos_sin)
        return q, k, v, residual

    def attn_out(self, o: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer after attention: o_proj, the post-attention norm (adding the residual) and the MLP.
        o [T, Hq, D] -> (x, residual)."""
        h = self.self_attn.o_proj(o.reshape(o.shape[0], self.self_attn.q_size))
        fp8_mlp = self.mlp.gate_up_proj.takes_fp8_input
        add_norm = self.ops.fused_add_rms_norm_quant if fp8_mlp else self.ops.fused_add_rms_norm
        h, residual = add_norm(h, residual, self.post_attention_layernorm, self.eps)
        return self.mlp(h), residual

    def forward(self, x, residual, meta, kv, cos_sin):
        q, k, v, residual = self.attn_in(x, residual, meta.positions, meta.slot_mapping, kv, cos_sin)
        return self.attn_out(self.self_attn.attend(q, k, v, meta, kv), residual)


class LlamaForCausalLM(nn.Module):
    """The whole decoder plus LM head; `forward` returns final hidden states, `compute_logits` the vocab scores."""

    def __init__(self, cfg: ModelConfig, ops: Ops, tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.tp = tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, tp) for _ in range(cfg.num_layers))
        self.norm = empty_param(cfg.hidden_size)
        self.lm_head = None if cfg.tie_word_embeddings else ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)

    def forward(
        self, meta: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], cos_sin: torch.Tensor
    ) -> torch.Tensor:
        x = self.embed_tokens(meta.input_ids)  # [T, hidden]
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, meta, kv, cos_sin)
        return self.final_norm(x, residual)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last layer's output plus its residual, RMS-normed: the hidden states the LM head reads."""
        x, _ = self.ops.fused_add_rms_norm(x, residual, self.norm, self.cfg.rms_norm_eps)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [S, hidden] -> logits [S, vocab] in the model's dtype (padded to a multiple of the ranks; None on
        ranks other than 0, which gathers them)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return head.logits(hidden)
