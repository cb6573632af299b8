"""Pure-PyTorch reference ops: the CPU backend and the ground truth every Triton kernel is tested against.

KV cache layout (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Token t of a sequence lives in block block_table[t // block_size], row t % block_size; the flat
slot index is block_id * block_size + row. An fp8 (e4m3) cache holds x / scale with one scale per
layer for K and one for V (spool.kernels.fp8); other caches ignore the scales.

FP8 activations (the input of an FP8 linear layer) are a pair (q float8_e4m3fn [..., K], scale float32
[..., 1]) with x ~= q * scale, one scale per row (token): quantize_per_token_fp8 and the *_quant variants
of the ops that produce those inputs, which quantize exactly what the plain op returns.
"""
from __future__ import annotations

import torch

from spool.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, is_fp8, quantize


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: normalize in float32, cast back, then scale.

    x [..., hidden], weight [hidden].
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual'). x, residual [T, hidden]."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2*d] = [gate | up] -> silu(gate) * up, [..., d]."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (e4m3 [..., K], float32 scale [..., 1]): scale = max(amax / 448, MIN_SCALE), q = x / scale.

    amax = max |x| over the row (exact in x's dtype). Both divisions are IEEE float32 divisions by a tensor:
    CUDA torch turns a division by a Python scalar into a multiplication by its reciprocal (one bit off at
    times), which would make the scales differ between devices. The cast rounds to nearest even; since
    scale >= amax / 448, |x / scale| <= 448 up to one float32 ulp, which rounds to 448: nothing saturates.
    """
    # The inf-norm is max |x| in one pass without an |x| temporary.
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True).float()  # [..., 1]
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp_(min=MIN_SCALE)  # [..., 1]
    return (x / scale).to(FP8_DTYPE), scale  # x / fp32 scale -> fp32 temporary -> e4m3


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token_fp8(rms_norm(x, weight, eps)): the normed rows, rounded to their dtype, in fp8."""
    return quantize_per_token_fp8(rms_norm(x, weight, eps))


def fused_add_rms_norm_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """fused_add_rms_norm with the normed rows per-token quantized: ((q, scale), residual')."""
    normed, new_residual = fused_add_rms_norm(x, residual, weight, eps)
    return quantize_per_token_fp8(normed), new_residual


def silu_and_mul_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token_fp8(silu_and_mul(x)): x [..., 2*d] -> (e4m3 [..., d], float32 scale [..., 1])."""
    return quantize_per_token_fp8(silu_and_mul(x))


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding.

    positions [T] int64; q [T, Hq, D]; k [T, Hk, D]; cos_sin_cache [max_pos, D] float32 holding
    cos in [:, :D/2] and sin in [:, D/2:]. Returns new (q, k) in the input dtype.
    """
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache.index_select(0, positions)
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def qk_norm_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    eps: float, cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head q/k RMSNorm, then rotary: q [T, Hq, D], k [T, Hk, D], weights [D]; new (q, k)."""
    return rotary_embedding(positions, rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos_sin_cache)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Scatter k, v [T, Hk, D] into the paged caches at slot_mapping [T]; slots < 0 are skipped (padding).

    An fp8 cache stores k / k_scale and v / v_scale, saturated to the e4m3 range.
    """
    nb, bs, hk, d = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    if is_fp8(k_cache.dtype):
        k, v = quantize(k, k_scale), quantize(v, v_scale)
    # index_copy_ has no fp8 kernel on the CPU: copy the bytes through a uint8 view when the cache is fp8
    as_bytes = k_cache.element_size() == 1
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if as_bytes else (k_cache, v_cache)
    kr, vr = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if as_bytes:
        kr, vr = kr.view(torch.uint8), vr.view(torch.uint8)
    blk, row = slot_mapping // bs, slot_mapping % bs  # (block, row) indexing: any cache strides
    kc[blk, row] = kr
    vc[blk, row] = vr


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> torch.Tensor:
    """One sequence's first context_len rows of a paged cache: [context_len, Hk, D], in the cache's dtype."""
    bs = cache.shape[1]
    nblocks = (context_len + bs - 1) // bs
    blocks = block_table[:nblocks].long()
    if cache.element_size() == 1:  # fp8: gather the bytes (not every device has fp8 index kernels)
        return cache.view(torch.uint8).index_select(0, blocks).flatten(0, 1)[:context_len].view(cache.dtype)
    return cache.index_select(0, blocks).flatten(0, 1)[:context_len]


def dequantized_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    """gather_kv in float32, times scale when the cache is fp8: [context_len, Hk, D]."""
    rows = gather_kv(cache, block_table, context_len).float()
    return rows * scale if is_fp8(cache.dtype) else rows


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole paged context.

    k_new / v_new [T, Hk, D]: the step's own keys and values (row i of q's rows is the token whose key is
    row i), which the caller has also written to the caches. A sequence with more than one query (a prompt
    chunk) takes its last query_len keys and values from them rather than from the cache, as the Triton
    kernel reads them contiguously there: the same values for a cache of q's dtype, the unquantized ones for
    an fp8 cache (as SGLang's extend attention). One-query sequences (decodes) read the cache only.

    q [T, Hq, D]; block_tables [S, max_blocks] int32; seq_lens [S] (context incl. new tokens);
    query_start_loc [S+1]. Query i of a sequence with L new tokens and context C sits at position
    C - L + i and sees keys 0 .. C - L + i. GQA: query head h reads KV head h // (Hq // Hk).
    Computed in float32; returns [T, Hq, D] in q's dtype. max_query_len / max_seq_len are hints
    that kernels use for launch sizing; the reference ignores them. fp8 caches are read as
    stored * k_scale (K) and stored * v_scale (V). out: a [T, Hq, D] tensor of q's dtype to write (and return).
    """
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, ctx in enumerate(lens):
        start, end = qsl[s], qsl[s + 1]
        qlen = end - start
        if qlen == 0:
            continue
        qs = q[start:end].float().transpose(0, 1)  # [Hq, L, D]
        ks = dequantized_kv(k_cache, block_tables[s], ctx, k_scale)  # [C, Hk, D]
        vs = dequantized_kv(v_cache, block_tables[s], ctx, v_scale)
        if k_new is not None and qlen > 1:
            ks[ctx - qlen:] = k_new[start:end].float()
            vs[ctx - qlen:] = v_new[start:end].float()
        ks, vs = ks.transpose(0, 1), vs.transpose(0, 1)  # [Hk, C, D]
        if group > 1:
            ks = ks.repeat_interleave(group, dim=0)
            vs = vs.repeat_interleave(group, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # [Hq, L, C]
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        scores.masked_fill_(kpos > qpos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, vs).transpose(0, 1).to(q.dtype)
    return out
