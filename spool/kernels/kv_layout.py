"""The paged KV caches' memory layout: allocate_kv_cache makes one layer's K and V caches as the engine holds them."""
from __future__ import annotations

import torch

from spool.kernels.fp8 import is_fp8


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device | str, v_keys_fastest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V caches, zeroed, each indexed [num_blocks, block_size, Hk, D] and stored row-major.

    v_keys_fastest (fp8 only; an experiment, off in the engine): store V as [num_blocks, Hk, D, block_size] in
    memory, returned as the permuted view. P @ V reduces over keys, and the tensor cores take an 8-bit operand
    only with its reduction dimension contiguous (there is no 8-bit transposing ldmatrix), so a row-major fp8 V
    tile reaches them one byte per shared-memory load (128 loads per thread per 64-key tile); keys-fastest, 16
    bytes at a time, and the decode kernel executes 37% fewer instructions. vLLM's first PagedAttention kernels
    kept V this way. Measured on the H200 (bench/RESULTS.md, ninth session): with 64-key tiles it is 2x slower at
    block 64 (the engine's default) and lost end to end (12,119 vs 14,895 tok/s); with the 128-key tiles
    paged_attention now picks for it at block >= 64 it is the fastest fp8 decode measured (B=64 x 4096: x1.767
    of SDPA on bf16 KV, against x1.684 row-major). Tenth session, end to end (llama3-8b fp8 weights + fp8 KV,
    two alternated pairs): +0.4% and +0.7%, but the prefill kernel over a cached prefix reads it much slower
    (2048 new tokens after 2048 cached: 430.8 us against 316.0 us row-major), and every chunk after a long
    prompt's first, and every prefix-cache hit, runs that path; so the engine stays row-major. Every kernel
    and the reference take the caches by strides, so either layout reads right.

    Zeroed, and written only by write_kv_cache (which stores NaN as 0 and saturates): an fp8 cache never holds
    NaN, which spool.kernels.paged_attention relies on to load the last page of a context whole (a dead row's p is 0,
    and 0 * NaN would be NaN).
    """
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.zeros(shape, dtype=dtype, device=device)
    if v_keys_fastest and is_fp8(dtype):
        v = torch.zeros((num_blocks, num_kv_heads, head_dim, block_size), dtype=dtype, device=device)
        v = v.permute(0, 3, 1, 2)
    else:
        v = torch.zeros(shape, dtype=dtype, device=device)
    return k, v


def v_keys_fastest(v_cache: torch.Tensor) -> bool:
    """V stored keys-fastest ([blocks, Hk, D, block_size] in memory, allocate_kv_cache's v_keys_fastest)."""
    return v_cache.stride(1) == 1 and v_cache.stride(3) != 1
