"""Prompt-chunk attention for Hopper in Gluon, FlashAttention-3's way: a TMA warp feeding two consumer warpgroups.

Computes what spool.kernels.paged_attention computes for prompt chunks given k_new / v_new (the step's own keys,
read contiguously; the cached prefix through the pages), for caches of q's dtype or fp8 e4m3. Written in Gluon
(triton.experimental.gluon), Triton's lower-level language, because Triton's own cannot express what
FlashAttention-3 adds on Hopper: Triton 3.6 waits for every wgmma group right after issuing it, so a tile's softmax
never runs while the tensor cores work (read in the PTX, bench/RESULTS.md ninth session), and its warp
specialization does nothing on Hopper. Here (FlashAttention-3, algorithms 1 and 2):
- warp specialization: one producer warp issues the TMA loads of K/V tiles into a ring of STAGES buffers
  (mbarriers: `ready` when a tile has landed, `empty` when both consumers are done with it); two consumer
  warpgroups of 64 query rows each run the math on their own schedule, so one's softmax overlaps the other's
  wgmma;
- in-warpgroup overlap: each iteration issues the next tile's q @ k and this tile's P @ V asynchronously, waits
  for q @ k only, and runs the softmax while P @ V is still on the tensor cores;
- persistent programs: one per SM (or per work item, `persistent=False`), walking work items in order, so the
  producer already streams the next item's first tiles while the consumers finish the current one.

A work item = (query tile, KV head), as in paged_attention: BLOCK_M rows = BLOCK_Q tokens x GROUP query heads of
one sequence, later query tiles first. Its keys, in order: the cached prefix in BLOCK_N-key tiles (one TMA box per
page part, min(page, BLOCK_N) rows each), then the chunk's own keys 0 .. its last query from k/v_new. Tiles that
reach past the prefix or the first query's position are masked; a prefix tile reaching past the context has its
dead V rows zeroed in shared memory after it lands (pages past a context may hold anything, NaN included, and
p = 0 times NaN is NaN). k/v_new rows past a sequence (the next sequence's, or zeros past the step) are masked,
never zeroed: they are the step's own finite keys and values.

An fp8 cache's prefix tiles land in an fp8 ring of their own, and a fourth warpgroup, the converter, widens them
into the 16-bit ring beside the consumers' wgmmas (FlashAttention-3's way for fp8); k_scale folds into the score
scale and v_scale into p for those tiles. The widening is exact for every e4m3 code but the NaNs, and for a bf16 q
it is integer work plus one multiply per pair (E4M3_TO_BF16_PTX), not Triton's conversion, whose e4m3 -> f16 ->
bf16 path spends one slow F2F per element. Three ways were measured on the H200 (RESULTS.md, fifteenth session):
both consumers widening each tile before their wgmmas, each widening half and waiting for the other, and the
converter. At 2048 new tokens after 2048 fp8-cached ones they ran at 69%, 80% and 85% of SDPA causal with Triton's
conversion, and at 85%, 90% and 105% with E4M3_TO_BF16_PTX; only the converter is kept. Fresh prompts never read
the cache, so fp8 and bf16 run alike there.

Measured on the H200 (bench/attn_workload.py, bench/RESULTS.md thirteenth and fifteenth sessions; SDPA causal on
2048 tokens = 100%): 2048 fresh tokens 95-99% (the Triton kernel: 74-75%), 2048 after 2048 cached 116-119% (76%),
105% after 2048 fp8-cached (67%), an 8,192-token step of 16 fresh prompts 61-63% (50%). Host time per call is
~40-100 us above the Triton kernel's (four TMA descriptors encoded per launch).

Numerics as the Triton kernel: scores and softmax in fp32 (base 2, online), P rounded to q's dtype before P @ V.
Runs only on compute capability 9.x (wgmma) and is never interpreted: the CPU tests check the dispatch, the GPU
tier checks the kernel against spool.kernels.reference.paged_attention.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

try:  # Gluon ships with Triton >= 3.5; without it paged_attention keeps its Triton kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

from spool.kernels.fp8 import FP8_DTYPE, is_fp8
from spool.kernels.sizes import cdiv
from spool.kernels.tile_slots import find_seq

log = logging.getLogger(__name__)

BLOCK_M = 128  # query rows per work item: two consumer warpgroups of 64
CONSUMER_REGS = 240  # setmaxnreg for the consumer warpgroups; the producer warp's warpgroup gives back down to 24
MAXNREG = 168  # at launch: 3 warpgroups x 128 threads x 168 fit the SM's 64K registers (ptxas allocates within it)
# An fp8 cache adds a fourth warpgroup, the converter: 4 x 128 threads x 128 at launch, then consumers 216 + 216,
# converter 56 and the producer's 24 (their sum, 512, is the SM's 64K registers per thread of a warpgroup). The
# consumers' sm_90 code uses up to ~213 registers; at 208 ptxas still spills nothing (Triton 3.6, on the CPU).
FP8_CONSUMER_REGS, CONVERT_REGS, FP8_MAXNREG = 216, 56, 128
# (block_n, stages) measured in bench/attn_workload.py. 128-key tiles spill at 168 registers (ptxas: 36 bytes) and ran
# 5-10% slower on the H200 (RESULTS.md, thirteenth session): not offered.
CONFIGS = ((64, 3), (64, 4))


# fp8 e4m3 to bf16, 4 elements per 32-bit register: each byte goes to the top of a 16-bit lane with its sign
# replicated above it (prmt), a shift by 4 and a mask leave sign | exponent | mantissa where bf16 keeps them, and
# the exponent bias (7 against 127) is one exact multiply by 2^120 (bf16 0x7B80). Exact for every code but the
# two NaNs (0x7F / 0xFF read as +-480; spool's KV writes saturate to +-448 and never store them). Triton's own
# conversion goes e4m3 -> f16 -> bf16 with one F2F per element on the SM's slow conversion pipe (sm_90 SASS).
E4M3_TO_BF16_PTX = """{
.reg .b32 lo, hi, k;
prmt.b32 lo, $2, 0, 0x9180;
prmt.b32 hi, $2, 0, 0xB3A2;
shl.b32 lo, lo, 4;
shl.b32 hi, hi, 4;
and.b32 lo, lo, 0x87F087F0;
and.b32 hi, hi, 0x87F087F0;
mov.b32 k, 0x7B807B80;
mul.rn.bf16x2 $0, lo, k;
mul.rn.bf16x2 $1, hi, k;
}"""


def _default_tiles(text: str) -> tuple[int, int, int]:
    """SPOOL_GLUON_PREFILL="block_n,stages,persistent" (benchmarks; default "64,4,1")."""
    try:
        bn, st, pers = (int(x) for x in text.split(","))
    except ValueError:
        bn = st = pers = -1
    if bn not in (64, 128) or not 2 <= st <= 4 or pers not in (0, 1):
        raise ValueError(f"SPOOL_GLUON_PREFILL={text!r}: want 'block_n,stages,persistent', e.g. '64,4,1' "
                         "(block_n 64 or 128, stages 2-4, persistent 0 or 1)")
    return bn, st, pers


BLOCK_N, STAGES, PERSISTENT = _default_tiles(os.environ.get("SPOOL_GLUON_PREFILL") or "64,4,1")


# Gluon is experimental and its API changes between Triton releases (3.9 renamed async_copy_global_to_shared to
# async_load and dropped thread_barrier), so the kernel runs only on the releases it was written and tested on
# (the GPU tier, bench/RESULTS.md); with any other, prompt chunks stay on the Triton kernel.
GLUON_TRITON_RELEASES = ("3.6", )


def triton_release() -> str:
    """The installed Triton's major.minor, e.g. "3.6" ("none" without Triton)."""
    try:
        import triton
    except ImportError:  # pragma: no cover - the engine's GPU path needs Triton anyway
        return "none"
    return ".".join(triton.__version__.split(".")[:2])


def available() -> bool:
    """Gluon importable and this Triton release one the kernel is written for (it also needs a Hopper GPU: see
    supported)."""
    return gluon is not None and triton_release() in GLUON_TRITON_RELEASES


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
              v_new: torch.Tensor) -> bool:
    """Whether prefill_attention can serve this call: a Hopper GPU (wgmma), a Triton release the kernel is written
    for, and layout_ok. Else the Triton kernel."""
    if q.device.type != "cuda" or not _hopper(q.device) or not _available_said():
        return False
    return layout_ok(q, k_cache, v_cache, k_new, v_new)


def layout_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
              v_new: torch.Tensor) -> bool:
    """fp16/bf16 with a cache of q's dtype or fp8 e4m3, head_dim 64 or 128, pages of >= 8 rows stored row-major and
    densely (TMA reads them as one [blocks * page, Hk * D] matrix), k/v_new rows of Hk * D contiguous elements, and
    the 16-byte alignment TMA needs."""
    d = q.shape[2]
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype not in (q.dtype, FP8_DTYPE):
        return False
    if d not in (64, 128):
        return False
    if k_cache.shape[1] < 8 or q.shape[1] // k_cache.shape[2] > BLOCK_M:
        return False
    esz = q.element_size()
    for t in (k_new, v_new):
        if t.stride(2) != 1 or t.stride(1) != d or (t.stride(0) * esz) % 16 or t.data_ptr() % 16:
            return False
    for c in (k_cache, v_cache):  # [blocks, page, Hk, D] with rows of Hk * D contiguous elements
        if c.stride(3) != 1 or c.stride(2) != d or c.stride(1) != c.shape[2] * d:
            return False
        if c.stride(0) != c.shape[1] * c.stride(1):
            return False
        if c.data_ptr() % 16:
            return False
    return q.stride(2) == 1


if gluon is not None:

    @gluon.jit
    def _work_item(r, num_items, num_heads_kv, num_seqs, qsl_ptr, seq_lens_ptr, bt_ptr, stride_bt, BN: gl.constexpr,
                   BLOCK_Q: gl.constexpr):
        """This program's work item of round r: its query tile, context and key tiles. Item w = (tile slot w // Hk,
        KV head w % Hk); items come longest first, and rounds alternate direction over the programs (round r gives
        program p item r * P + p, or r * P + P - 1 - p), so long and short items even out per program. Items past
        the end, slots past a chunk, and one-query rows (the decode launch's) are not valid."""
        nprog = gl.num_programs(0)
        pid = gl.program_id(0)
        w_r = r * nprog + gl.where(r % 2 == 0, pid, nprog - 1 - pid)
        w = gl.minimum(w_r, num_items - 1)  # a past-the-end item reads a real slot; `valid` drops it
        slot = w // num_heads_kv
        kvh = w % num_heads_kv
        seq = find_seq(qsl_ptr, slot, num_seqs, BLOCK_Q)
        q_start = gl.load(qsl_ptr + seq)
        q_len = gl.load(qsl_ptr + seq + 1) - q_start
        local = slot - (q_start // BLOCK_Q + seq)
        q0 = (gl.cdiv(q_len, BLOCK_Q) - 1 - local) * BLOCK_Q  # later query tiles first: they see more keys
        valid = (local * BLOCK_Q < q_len) & (q_len > 1) & (w_r < num_items)
        ctx = gl.load(seq_lens_ptr + seq)
        prefix = ctx - q_len
        n_pre = gl.cdiv(prefix, BN)
        n_tiles = n_pre + gl.cdiv(gl.minimum(q0 + BLOCK_Q, q_len), BN)
        return valid, kvh, q_start, q_len, q0, ctx, prefix, n_pre, n_tiles, bt_ptr + seq.to(gl.int64) * stride_bt

    @gluon.jit
    def _issue_prefix(i, bar, k_dst, v_dst, kc_desc, vc_desc, bt_row, ctx, kvh, BN: gl.constexpr, SUB: gl.constexpr,
                      PAGE: gl.constexpr, HEAD_DIM: gl.constexpr):
        """TMA loads of prefix tile i from the pages into k_dst / v_dst (the cache's dtype), completing on bar."""
        mbarrier.expect(bar, 2 * (BN // SUB) * kc_desc.block_type.nbytes)
        for sub in gl.static_range(BN // SUB):
            # Keys past the context (the last prefix tile) load from the context's last part: masked later.
            pos = gl.minimum(i * BN + sub * SUB, (ctx - 1) // SUB * SUB)
            page = gl.load(bt_row + pos // PAGE).to(gl.int32)
            row = page * PAGE + pos % PAGE
            tma.async_copy_global_to_shared(kc_desc, [row, kvh * HEAD_DIM], bar, k_dst.slice(sub * SUB, SUB))
            tma.async_copy_global_to_shared(vc_desc, [row, kvh * HEAD_DIM], bar, v_dst.slice(sub * SUB, SUB))

    @gluon.jit
    def _issue_new(i, n_pre, bar, k_dst, v_dst, kn_desc, vn_desc, q_start, kvh, BN: gl.constexpr,
                   HEAD_DIM: gl.constexpr):
        """TMA loads of tile i (past the n_pre prefix tiles) of the chunk's own keys from k/v_new; rows past the
        step's tokens read as zeros (the descriptor's bounds), masked anyway."""
        mbarrier.expect(bar, 2 * kn_desc.block_type.nbytes)
        row = q_start + (i - n_pre) * BN
        tma.async_copy_global_to_shared(kn_desc, [row, kvh * HEAD_DIM], bar, k_dst)
        tma.async_copy_global_to_shared(vn_desc, [row, kvh * HEAD_DIM], bar, v_dst)

    @gluon.jit
    def _load_partition(args, BN: gl.constexpr, SUB: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                        STAGES: gl.constexpr, GROUP: gl.constexpr, BLOCK_Q: gl.constexpr, FP8: gl.constexpr):
        """The producer warp: the j-th tile it loads goes into slot j % STAGES once both consumers released the
        tile STAGES before it. An fp8 cache's prefix tiles go instead to the fp8 ring (slot j8 % STAGES for the
        j8-th of them, `ready8`), once both that slot is free (`empty8`, the converter) and slot j % STAGES of the
        16-bit ring, which the converter then fills."""
        (q_smem, k_ring, v_ring, k8_ring, v8_ring, ready, empty, ready8, empty8, kn_desc, vn_desc, kc_desc,
         vc_desc, num_items, num_heads_kv, num_seqs, qsl_ptr, seq_lens_ptr, bt_ptr, stride_bt, q_ptr, stride_qt,
         stride_qh, out_ptr, stride_ot, stride_oh, qk_scale, k_scale, v_scale) = args
        j = 0
        j8 = 0
        for r in range(gl.cdiv(num_items, gl.num_programs(0))):
            valid, kvh, q_start, q_len, q0, ctx, prefix, n_pre, n_tiles, bt_row = _work_item(
                r, num_items, num_heads_kv, num_seqs, qsl_ptr, seq_lens_ptr, bt_ptr, stride_bt, BN, BLOCK_Q)
            if valid:
                for i in range(n_tiles):
                    # Slot j % STAGES free: waited for every tile in order, whoever fills it (so the parity is
                    # never a lap behind: an fp8 cache's prefix tiles fill it through the converter). A fresh
                    # barrier passes parity 1.
                    stage = j % STAGES
                    mbarrier.wait(empty.index(stage), ((j // STAGES) & 1) ^ 1)
                    if i >= n_pre:
                        _issue_new(i, n_pre, ready.index(stage), k_ring.index(stage), v_ring.index(stage), kn_desc,
                                   vn_desc, q_start, kvh, BN, HEAD_DIM)
                    elif FP8:  # to the fp8 ring; the converter widens it into slot `stage`
                        s8 = j8 % STAGES
                        mbarrier.wait(empty8.index(s8), ((j8 // STAGES) & 1) ^ 1)
                        _issue_prefix(i, ready8.index(s8), k8_ring.index(s8), v8_ring.index(s8), kc_desc, vc_desc,
                                      bt_row, ctx, kvh, BN, SUB, PAGE, HEAD_DIM)
                        j8 += 1
                    else:
                        _issue_prefix(i, ready.index(stage), k_ring.index(stage), v_ring.index(stage), kc_desc,
                                      vc_desc, bt_row, ctx, kvh, BN, SUB, PAGE, HEAD_DIM)
                    j += 1

    _E4M3_TO_BF16 = gl.constexpr(E4M3_TO_BF16_PTX)

    @gluon.jit
    def _widen(x8, dtype: gl.constexpr):
        """An fp8 e4m3 tensor in registers as dtype (q's): bf16 through E4M3_TO_BF16_PTX, fp16 by Triton's
        conversion (one cvt per pair)."""
        if dtype == gl.bfloat16:
            return gl.inline_asm_elementwise(_E4M3_TO_BF16, "=r,=r,r", [x8], dtype=gl.bfloat16, is_pure=True,
                                             pack=4)
        else:
            return x8.to(dtype)

    @gluon.jit
    def _widen_rows(k8, v8, k16, v16, k0, ctx, R0: gl.constexpr, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Rows R0 .. R0 + ROWS of an fp8 prefix tile whose first key is k0, widened (_widen) into the slot's
        16-bit buffers; V rows of keys at or past ctx are zeroed (pages past a context may hold anything)."""
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
        keys = k0 + R0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, blk))
        k16.slice(R0, ROWS).store(_widen(k8.slice(R0, ROWS).load(blk), k16.dtype))
        v = _widen(v8.slice(R0, ROWS).load(blk), v16.dtype)
        v16.slice(R0, ROWS).store(gl.where(gl.expand_dims(keys < ctx, 1), v, gl.zeros_like(v)))

    @gluon.jit
    def _convert_partition(args, BN: gl.constexpr, SUB: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                           STAGES: gl.constexpr, GROUP: gl.constexpr, BLOCK_Q: gl.constexpr, FP8: gl.constexpr):
        """An fp8 cache's converter: a warpgroup of its own widens each fp8 prefix tile from the fp8 ring into the
        16-bit ring's slot j % STAGES, zeroing V rows past the context, and marks it ready; the consumers then read
        it like any tile, and the widening runs beside their wgmmas instead of before them. Tiles of the chunk's own
        keys pass it by (the producer loads them straight into the 16-bit ring). It never waits on `empty` itself:
        skipping the chunks' tiles, its parity could be a lap behind; the producer waits for every slot in order.
        (tests/test_prefill_protocol_model.py checks the protocol under random interleavings.)"""
        (k_ring, v_ring, k8_ring, v8_ring, ready, ready8, empty8, num_items, num_heads_kv, num_seqs, qsl_ptr,
         seq_lens_ptr, bt_ptr, stride_bt) = args  # what it needs of the kernel's, only
        HALF: gl.constexpr = BN // 2  # widened half a tile at a time: fewer registers live
        j = 0
        j8 = 0
        for r in range(gl.cdiv(num_items, gl.num_programs(0))):
            valid, kvh, q_start, q_len, q0, ctx, prefix, n_pre, n_tiles, bt_row = _work_item(
                r, num_items, num_heads_kv, num_seqs, qsl_ptr, seq_lens_ptr, bt_ptr, stride_bt, BN, BLOCK_Q)
            if valid:
                for i in range(n_pre):
                    s8 = j8 % STAGES
                    stage = (j + i) % STAGES
                    # landed; and slot `stage` is free, since the producer waited for that before loading it
                    mbarrier.wait(ready8.index(s8), (j8 // STAGES) & 1)
                    for h in gl.static_range(2):
                        _widen_rows(k8_ring.index(s8), v8_ring.index(s8), k_ring.index(stage), v_ring.index(stage),
                                    i * BN, ctx, h * HALF, HALF, HEAD_DIM)
                    fence_async_shared()  # the widened tile, before the consumers' wgmmas (the async proxy) read it
                    mbarrier.arrive(ready.index(stage), count=1)  # after all 128 threads (a barrier over the group)
                    mbarrier.arrive(empty8.index(s8), count=1)
                    j8 += 1
                j += n_tiles

    @gluon.jit
    def _tile_ready(i, j, n_pre, ctx, ready, v_ring, BN: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                    FP8: gl.constexpr):
        """Wait for key tile i in slot j. A 16-bit cache's last prefix tile then gets its V rows past the context
        zeroed in shared memory (pages past a context may hold NaN, and p = 0 times NaN is NaN); both warpgroups
        write the same zeros, each before its own wgmmas read them. An fp8 cache's converter did that, and the
        widening, before it marked the tile ready."""
        stage = j % STAGES
        mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
        if (not FP8) & (i < n_pre) & (i * BN + BN > ctx):
            blk: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
            live = gl.expand_dims(i * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, blk)) < ctx, 1)
            v = v_ring.index(stage).load(blk)
            v_ring.index(stage).store(gl.where(live, v, gl.zeros_like(v)))
            fence_async_shared()
            gl.thread_barrier()

    @gluon.jit
    def _mask_scores(s, i, n_pre, prefix, q0, q_abs, BN: gl.constexpr, s_layout: gl.constexpr):
        """-inf where key tile i's keys are past the prefix (prefix tiles) or after the row's query (causal)."""
        if i < n_pre:
            k0 = i * BN
            lim = prefix
        else:
            k0 = prefix + (i - n_pre) * BN
            lim = k0 + BN
        if (k0 + BN > lim) | (k0 + BN - 1 > prefix + q0):
            kp = k0 + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            ok = (gl.expand_dims(kp, 0) <= gl.expand_dims(q_abs, 1)) & gl.expand_dims(kp < lim, 0)
            s = gl.where(ok, s, gl.full_like(s, float("-inf")))
        return s

    @gluon.jit
    def _row_offsets(WG: gl.constexpr, q0, q_start, q_len, kvh, stride_t, stride_h, GROUP: gl.constexpr,
                     BLOCK_Q: gl.constexpr, HEAD_DIM: gl.constexpr, layout: gl.constexpr):
        """Element offsets [64, HEAD_DIM] of warpgroup WG's rows (token q0 + r // GROUP, head kvh * GROUP + r % GROUP)
        in a [T, H, D] tensor of strides (stride_t, stride_h, 1), in `layout`, and which rows are real."""
        rows = WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        qi = q0 + rows // GROUP
        off = gl.expand_dims((q_start + qi).to(gl.int64) * stride_t + (kvh * GROUP + rows % GROUP) * stride_h, 1) + \
            gl.expand_dims(cols, 0)
        return off, gl.expand_dims((rows < BLOCK_Q * GROUP) & (qi < q_len), 1)

    @gluon.jit
    def _consume(args, BN: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr,
                 BLOCK_Q: gl.constexpr, FP8: gl.constexpr, WG: gl.constexpr):
        """Consumer warpgroup WG: query rows WG * 64 .. + 63 of each work item against its key tiles."""
        (q_smem, k_ring, v_ring, k8_ring, v8_ring, ready, empty, ready8, empty8, kn_desc, vn_desc, kc_desc,
         vc_desc, num_items, num_heads_kv, num_seqs, qsl_ptr, seq_lens_ptr, bt_ptr, stride_bt, q_ptr, stride_qt,
         stride_qh, out_ptr, stride_ot, stride_oh, qk_scale, k_scale, v_scale) = args
        dtype: gl.constexpr = kn_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
        q_w = q_smem.slice(WG * 64, 64)
        s_zero = gl.zeros([64, BN], gl.float32, s_layout)
        j = 0
        for r in range(gl.cdiv(num_items, gl.num_programs(0))):
            valid, kvh, q_start, q_len, q0, ctx, prefix, n_pre, n_tiles, bt_row = _work_item(
                r, num_items, num_heads_kv, num_seqs, qsl_ptr, seq_lens_ptr, bt_ptr, stride_bt, BN, BLOCK_Q)
            if valid:
                # this warpgroup's 64 query rows (its previous item's wgmmas are done), while the producer streams
                q_off, q_ok = _row_offsets(WG, q0, q_start, q_len, kvh, stride_qt, stride_qh, GROUP, BLOCK_Q, HEAD_DIM,
                                           blk)
                q_w.store(gl.load(q_ptr + q_off, mask=q_ok, other=0.0))
                fence_async_shared()
                gl.thread_barrier()
                q_abs = prefix + q0 + (WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))) // GROUP

                # prefix tiles read the cache: stored * k_scale / v_scale (1 unless fp8), folded into the score
                # scale and into p for P @ V; the chunk's own keys are unscaled
                _tile_ready(0, j, n_pre, ctx, ready, v_ring, BN, HEAD_DIM, STAGES, FP8)
                s = warpgroup_mma(q_w, k_ring.index(j % STAGES).permute((1, 0)), s_zero, use_acc=False)
                s = _mask_scores(s, 0, n_pre, prefix, q0, q_abs, BN, s_layout)
                sc = gl.where(n_pre > 0, qk_scale * k_scale, qk_scale)
                m_i = gl.max(s, axis=1) * sc
                p = gl.exp2(s * sc - gl.expand_dims(m_i, 1))
                l_i = gl.sum(p, axis=1)
                p = gl.convert_layout((p * gl.where(n_pre > 0, v_scale, 1.0)).to(dtype), p_layout)
                acc = gl.zeros([64, HEAD_DIM], gl.float32, o_layout)
                for i in range(1, n_tiles):
                    _tile_ready(i, j + i, n_pre, ctx, ready, v_ring, BN, HEAD_DIM, STAGES, FP8)
                    s_tok = warpgroup_mma(q_w, k_ring.index((j + i) % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                          is_async=True)
                    acc_tok = warpgroup_mma(p, v_ring.index((j + i - 1) % STAGES), acc, is_async=True)
                    s = warpgroup_mma_wait(1, deps=(s_tok, ))  # this tile's scores; the previous P @ V runs on
                    s = _mask_scores(s, i, n_pre, prefix, q0, q_abs, BN, s_layout)
                    sc = gl.where(i < n_pre, qk_scale * k_scale, qk_scale)
                    m_new = gl.maximum(m_i, gl.max(s, axis=1) * sc)
                    p_new = gl.exp2(s * sc - gl.expand_dims(m_new, 1))
                    alpha = gl.exp2(m_i - m_new)
                    l_i = l_i * alpha + gl.sum(p_new, axis=1)
                    m_i = m_new
                    p_new = gl.convert_layout((p_new * gl.where(i < n_pre, v_scale, 1.0)).to(dtype), p_layout)
                    acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
                    mbarrier.arrive(empty.index((j + i - 1) % STAGES), count=1)  # done with the previous tile
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                    p = p_new
                acc = warpgroup_mma(p, v_ring.index((j + n_tiles - 1) % STAGES), acc)
                mbarrier.arrive(empty.index((j + n_tiles - 1) % STAGES), count=1)
                j += n_tiles

                l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
                out = (acc / gl.expand_dims(l_o, 1)).to(dtype)
                o_off, o_ok = _row_offsets(WG, q0, q_start, q_len, kvh, stride_ot, stride_oh, GROUP, BLOCK_Q, HEAD_DIM,
                                           o_layout)
                gl.store(out_ptr + o_off, out, mask=o_ok)

    @gluon.jit
    def _consume0(args, BN: gl.constexpr, SUB: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, GROUP: gl.constexpr, BLOCK_Q: gl.constexpr, FP8: gl.constexpr):
        _consume(args, BN, HEAD_DIM, STAGES, GROUP, BLOCK_Q, FP8, 0)

    @gluon.jit
    def _consume1(args, BN: gl.constexpr, SUB: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, GROUP: gl.constexpr, BLOCK_Q: gl.constexpr, FP8: gl.constexpr):
        _consume(args, BN, HEAD_DIM, STAGES, GROUP, BLOCK_Q, FP8, 1)

    # Batch-dependent ints unspecialized, as paged_attention's kernel: new batches never recompile.
    @gluon.jit(do_not_specialize=["num_items", "num_seqs", "stride_bt"])
    def _prefill_kernel(q_ptr, out_ptr, kn_desc, vn_desc, kc_desc, vc_desc, bt_ptr, seq_lens_ptr, qsl_ptr, qk_scale,
                        k_scale, v_scale, num_items, num_heads_kv, num_seqs, stride_qt, stride_qh, stride_ot,
                        stride_oh, stride_bt, GROUP: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_M: gl.constexpr,
                        BN: gl.constexpr, PAGE: gl.constexpr, SUB: gl.constexpr, HEAD_DIM: gl.constexpr,
                        STAGES: gl.constexpr, FP8: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        CONVERT_REGS: gl.constexpr):
        dtype: gl.constexpr = kn_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], kn_desc.layout)  # each consumer fills its half
        k_ring = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], kn_desc.layout)
        v_ring = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], kn_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        if FP8:  # the fp8 cache's prefix tiles land here (`ready8`); the converter widens them into k_ring / v_ring
            k8_ring = gl.allocate_shared_memory(kc_desc.dtype, [STAGES, BN, HEAD_DIM], kc_desc.layout)
            v8_ring = gl.allocate_shared_memory(kc_desc.dtype, [STAGES, BN, HEAD_DIM], kc_desc.layout)
            ready8 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            empty8 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())  # converter done
        else:  # never used
            k8_ring = k_ring
            v8_ring = v_ring
            ready8 = ready
            empty8 = empty
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=2)  # one arrival per consumer warpgroup
            if FP8:
                mbarrier.init(ready8.index(st), count=1)
                mbarrier.init(empty8.index(st), count=1)
        fence_async_shared()
        gl.thread_barrier()
        args = (q_smem, k_ring, v_ring, k8_ring, v8_ring, ready, empty, ready8, empty8, kn_desc, vn_desc,
                kc_desc, vc_desc, num_items, num_heads_kv, num_seqs, qsl_ptr, seq_lens_ptr, bt_ptr, stride_bt, q_ptr,
                stride_qt, stride_qh, out_ptr, stride_ot, stride_oh, qk_scale, k_scale, v_scale)
        if FP8:  # a fourth warpgroup, the converter, between the consumers and the producer warp
            gl.warp_specialize([(_consume0, (args, BN, SUB, PAGE, HEAD_DIM, STAGES, GROUP, BLOCK_Q, FP8)),
                                (_consume1, (args, BN, SUB, PAGE, HEAD_DIM, STAGES, GROUP, BLOCK_Q, FP8)),
                                (_convert_partition, ((k_ring, v_ring, k8_ring, v8_ring, ready, ready8, empty8,
                                                       num_items, num_heads_kv, num_seqs, qsl_ptr, seq_lens_ptr,
                                                       bt_ptr, stride_bt), BN, SUB, PAGE, HEAD_DIM, STAGES, GROUP,
                                                      BLOCK_Q, FP8)),
                                (_load_partition, (args, BN, SUB, PAGE, HEAD_DIM, STAGES, GROUP, BLOCK_Q, FP8))],
                               [4, 4, 1], [CONSUMER_REGS, CONVERT_REGS, 24])
        else:
            gl.warp_specialize([(_consume0, (args, BN, SUB, PAGE, HEAD_DIM, STAGES, GROUP, BLOCK_Q, FP8)),
                                (_consume1, (args, BN, SUB, PAGE, HEAD_DIM, STAGES, GROUP, BLOCK_Q, FP8)),
                                (_load_partition, (args, BN, SUB, PAGE, HEAD_DIM, STAGES, GROUP, BLOCK_Q, FP8))],
                               [4, 1], [CONSUMER_REGS, 24])


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, k_new: torch.Tensor,
                      v_new: torch.Tensor, scale: float, out: torch.Tensor, *, k_scale: float = 1.0,
                      v_scale: float = 1.0, block_n: int = BLOCK_N, stages: int = STAGES,
                      persistent: bool = bool(PERSISTENT)) -> None:
    """Write out's rows of the prompt chunks (sequences with > 1 query); one-query rows are left to the caller.

    Arguments as spool.kernels.paged_attention's (already checked there); block_tables with unit column stride,
    int32 seq_lens / query_start_loc. Call only where supported() holds. block_n / stages: the key tile and the
    depth of the TMA ring; persistent: one program per SM walking the work items, else one per item.
    """
    t, hq, d = q.shape
    nb, page, hk, _ = k_cache.shape
    group = hq // hk
    seq_lens, query_start_loc = seq_lens.to(torch.int32), query_start_loc.to(torch.int32)  # TMA coordinates are i32
    s = seq_lens.shape[0]
    block_q = BLOCK_M // group
    sub = min(page, block_n)
    fp8 = is_fp8(k_cache.dtype)
    layout = _smem_layout(block_n, d, _gl_dtype(q.dtype))
    cache_layout = _smem_layout(block_n, d, gl.float8e4nv) if fp8 else layout
    descs = [TensorDescriptor(x, [t, hk * d], [x.stride(0), 1], [block_n, d], layout) for x in (k_new, v_new)]
    descs += [TensorDescriptor(c, [nb * page, hk * d], [hk * d, 1], [sub, d], cache_layout) for c in (k_cache, v_cache)]
    log2e = 1.4426950408889634
    items = (cdiv(t, block_q) + s) * hk  # tile slots (an upper bound on the chunks' query tiles) x KV heads
    grid = min(items, _num_sms(q.device)) if persistent else items
    _prefill_kernel[(grid,)](
        q, out, *descs, block_tables, seq_lens, query_start_loc, scale * log2e, k_scale, v_scale, items, hk, s,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=BLOCK_M, BN=block_n, PAGE=page, SUB=sub, HEAD_DIM=d, STAGES=stages,
        FP8=fp8, CONSUMER_REGS=FP8_CONSUMER_REGS if fp8 else CONSUMER_REGS, CONVERT_REGS=CONVERT_REGS, num_warps=4,
        maxnreg=FP8_MAXNREG if fp8 else MAXNREG,
    )


@functools.cache
def _available_said() -> bool:
    """available(), logged once when a Hopper GPU has to do without the kernel."""
    if not available():
        why = "Gluon is missing" if gluon is None else f"it is written for Triton {', '.join(GLUON_TRITON_RELEASES)}"
        log.info("prompt attention runs on the Triton kernel, not the Gluon one for Hopper: %s, and this is "
                 "Triton %s", why, triton_release())
    return available()


@functools.cache
def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


@functools.cache
def _smem_layout(block_n: int, d: int, dtype):
    return gl.NVMMASharedLayout.get_default_for([block_n, d], dtype)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
