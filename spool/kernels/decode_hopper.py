"""Decode attention over an fp8 KV cache for Hopper in Gluon: K/V pages by TMA into a ring, tensor-core math.

Computes what spool.kernels.paged_attention computes for one-query rows (decode), for caches of fp8 e4m3 with pages
of >= BLOCK_N rows, V stored row-major or keys-fastest (spool.kernels.kv_layout). One program per (KV head,
sequence), one warpgroup, the KV heads of a sequence launched side by side (so the pages' K/V rows of all heads,
which lie together in memory, are read together). The GROUP query heads sharing the KV head are the rows of a 16-row
tile (mma.sync m16n8k16, the smallest tensor-core tile), so each K/V tile is read once per head group. The program
fills a ring of STAGES tile slots by TMA (one elected thread issues a K and a V copy per tile, STAGES - 1 tiles
ahead of the math), so no thread spends instructions on copies; K^T and V then load from shared memory straight into
mma operand registers (two e4m3 codes per 16-bit lane along the reduction: V row-major loads byte by byte,
keys-fastest two bytes at a time) and widen to fp16 there (one cvt per pair; exact for every e4m3 code). q is
rounded to fp16 once and P to fp16 before P @ V, as the Triton kernel does for fp8 caches with a bf16 q; k_scale
folds into the score scale and v_scale into the final normalization; the last tile's keys past the context are
masked (an fp8 cache never holds NaN, so its dead V rows only ever meet p = 0).

Measured on the H200 (bench/attn_workload.py --graphs, bench/RESULTS.md sixteenth and seventeenth sessions; 32/8
heads, d128, block 64), against the Triton kernel's fp8 decode tiles, first with the sequences on the grid's first
axis:
- the llama3-8b workload's contexts (512 x U[128,1024]): 187 us against 215 us (-13%), V row-major;
- B=64 x 4096: 145.6 us against 149.9 (x1.749 of SDPA on bf16 KV against x1.699); V keys-fastest 142.7 us (x1.785);
- llama3-8b, fp8 weights + fp8 KV, end to end: 14,935 tok/s against 14,473 (+3.2%, one pair, ring of 3).
Launching the KV heads of a sequence side by side (the grid's first axis; sequences came first before) took
B=64 x 4096 from 146.7-146.9 to 140.7-140.8 us (x1.736-1.738 -> x1.809-1.813 of SDPA), the workload's contexts from
186.8-186.9 to 178.4-178.6 us, and llama3-8b end to end to 15,128 tok/s (15,083 before, Triton decode 14,594);
x1.807-1.814 on three H200s, x1.769-1.771 on a fourth whose SDPA ran faster and this kernel slower. Why: a
page holds each token's rows of all KV heads together (1 KB per token at 8 x 128), a program reads its head's 128
bytes of each, and the programs that run together now cover whole pages. Storing each head's rows of a page
together instead (head-major, 8 KB contiguous per tile) was as fast as the new order (139.8 us), not faster, so the
engine keeps its layout.
Shallow rings win: at 2 or 3 slots (34 or 51 KB of shared memory) four programs share an SM and B=64 x 8 heads
runs in one wave; at 4 (67 KB) three do, and B=64 x 4096 took 205 us. Also measured and not kept: a fifth,
producer warp issuing the copies (warp specialization; 146.7-159.4 us), and each warp keeping its own softmax
state over a quarter of every tile (no cross-warp reductions, but four times the accumulator registers:
155-185 us), the score tile moved to P's operand layout before the softmax (row max and sum within warps, one
relayout instead of three cross-warp exchanges: 142.8 against 142.2 us), and K^T and row-major V read from
shared memory in 16- and 4-byte loads with d permuted (a quarter of the loads: 142.4 against 142.2 us), and L2
prefetches of the tiles 2-8 ahead (154-213 us against 141). The math is not the limit; how the pages are read is.

No split-KV: paged_attention uses this kernel only where (sequences x KV heads) fill the GPU on their own.
Runs only on compute capability 9.x with the Triton releases of spool.kernels.prefill_hopper, never interpreted:
the CPU tests check the layouts it takes, its settings and its descriptor cache; the GPU tier checks the kernel
against spool.kernels.reference.paged_attention and the dispatch.
"""
from __future__ import annotations

import functools
import os
import weakref

import torch

from spool.kernels import prefill_hopper
from spool.kernels.fp8 import FP8_DTYPE
from spool.kernels.kv_layout import v_keys_fastest

if prefill_hopper.gluon is not None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
else:  # pragma: no cover - depends on the installed Triton
    gluon = None

BLOCK_M = 16  # query rows per program (GROUP heads of one token, padded): one mma.sync row tile
BLOCK_N = 64  # keys per tile: one page part; pages must hold whole tiles
MAX_SEQS = 65535  # sequences per launch: the grid's second axis


def _stages(text: str) -> int:
    """SPOOL_GLUON_DECODE_STAGES (benchmarks; default 2): the TMA ring's depth, 2-10."""
    try:
        st = int(text)
    except ValueError:
        st = -1
    if not 2 <= st <= 10:
        raise ValueError(f"SPOOL_GLUON_DECODE_STAGES={text!r}: want the TMA ring's depth, 2-10")
    return st


STAGES = _stages(os.environ.get("SPOOL_GLUON_DECODE_STAGES") or "2")


def layout_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """An fp8 cache read by fp16/bf16 queries, head_dim 64 or 128, at most BLOCK_M query heads per KV head, pages
    of whole BLOCK_N-key tiles, K stored densely row-major and V row-major or keys-fastest (TMA reads them as
    [blocks * page, Hk * D], or V as [blocks * Hk * D, page]), with the 16-byte alignment TMA needs."""
    _, hq, d = q.shape
    _, page, hk, _ = k_cache.shape
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != FP8_DTYPE or v_cache.dtype != FP8_DTYPE:
        return False
    if d not in (64, 128) or hq // hk > BLOCK_M or page % BLOCK_N or q.stride(2) != 1:
        return False
    if not k_cache.is_contiguous() or k_cache.data_ptr() % 16 or v_cache.data_ptr() % 16:
        return False
    if v_keys_fastest(v_cache):
        return v_cache.permute(0, 2, 3, 1).is_contiguous()
    return v_cache.is_contiguous()


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether decode_attention can serve this call: a Hopper GPU, a Triton release the Gluon kernels are written
    for (spool.kernels.prefill_hopper's checks, cached: this runs per layer per step), and layout_ok."""
    if q.device.type != "cuda" or not prefill_hopper._hopper(q.device) or not prefill_hopper._available_said():
        return False
    return layout_ok(q, k_cache, v_cache)


if gluon is not None:

    @gluon.jit
    def _issue(i, bar, k_dst, v_dst, kc_desc, vc_desc, bt_row, kvh, HK: gl.constexpr, BN: gl.constexpr,
               PAGE: gl.constexpr, HEAD_DIM: gl.constexpr, V_KEYS: gl.constexpr):
        """TMA loads of key tile i (one page part) into k_dst / v_dst, completing on bar."""
        mbarrier.expect(bar, 2 * kc_desc.block_type.nbytes)
        pos = i * BN
        page = gl.load(bt_row + pos // PAGE).to(gl.int32)
        row = page * PAGE + pos % PAGE
        tma.async_copy_global_to_shared(kc_desc, [row, kvh * HEAD_DIM], bar, k_dst)
        if V_KEYS:  # [blocks * Hk * D, page]: the head's D rows of the page, keys along them
            tma.async_copy_global_to_shared(vc_desc, [(page * HK + kvh) * HEAD_DIM, pos % PAGE], bar, v_dst)
        else:
            tma.async_copy_global_to_shared(vc_desc, [row, kvh * HEAD_DIM], bar, v_dst)

    @gluon.jit
    def _tile_math(i, st, q, m_i, l_i, acc, ctx, qk_scale, k_ring, v_ring, ready, BN: gl.constexpr,
                   STAGES: gl.constexpr, V_KEYS: gl.constexpr, mma: gl.constexpr, a_layout: gl.constexpr,
                   b_layout: gl.constexpr):
        """Key tile i (in slot st, once landed) folded into the online softmax (m_i, l_i) and acc."""
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        k_t = k_ring.index(st).permute((1, 0)).load(b_layout).to(gl.float16)  # [D, BN]
        s = mma_v2(q, k_t, gl.zeros([q.shape[0], BN], gl.float32, mma))
        if i * BN + BN > ctx:  # the last tile: keys past the context
            keys = i * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
            s = gl.where(gl.expand_dims(keys < ctx, 0), s, gl.full_like(s, float("-inf")))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        p = gl.convert_layout(p.to(gl.float16), a_layout)
        if V_KEYS:
            v = v_ring.index(st).permute((1, 0)).load(b_layout).to(gl.float16)  # [BN, D]
        else:
            v = v_ring.index(st).load(b_layout).to(gl.float16)
        acc = mma_v2(p, v, acc * gl.expand_dims(alpha, 1))
        return m_new, l_i, acc

    # The block table's row stride changes with the batch: unspecialized, so new batches never recompile.
    @gluon.jit(do_not_specialize=["stride_bt"])
    def _decode_kernel(q_ptr, out_ptr, kc_desc, vc_desc, bt_ptr, seq_lens_ptr, qsl_ptr, qk_scale, v_scale,
                       stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, GROUP: gl.constexpr,
                       HK: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, PAGE: gl.constexpr,
                       HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, V_KEYS: gl.constexpr):
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        kvh = gl.program_id(0)  # a sequence's KV heads side by side: together they read whole pages
        seq = gl.program_id(1)
        q_start = gl.load(qsl_ptr + seq)
        q_len = gl.load(qsl_ptr + seq + 1) - q_start
        if q_len == 1:  # a decode row (longer rows are prompt chunks: the prompt launch's; 0: idle)
            k_ring = gl.allocate_shared_memory(kc_desc.dtype, [STAGES, BN, HEAD_DIM], kc_desc.layout)
            if V_KEYS:
                v_ring = gl.allocate_shared_memory(vc_desc.dtype, [STAGES, HEAD_DIM, BN], vc_desc.layout)
            else:
                v_ring = gl.allocate_shared_memory(vc_desc.dtype, [STAGES, BN, HEAD_DIM], vc_desc.layout)
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for b in gl.static_range(STAGES):
                mbarrier.init(ready.index(b), count=1)
            fence_async_shared()
            gl.thread_barrier()

            ctx = gl.load(seq_lens_ptr + seq)
            n_tiles = gl.cdiv(ctx, BN)
            bt_row = bt_ptr + seq.to(gl.int64) * stride_bt
            for i in gl.static_range(STAGES - 1):  # the ring's first tiles, while q loads
                if i < n_tiles:
                    _issue(i, ready.index(i), k_ring.index(i), v_ring.index(i), kc_desc, vc_desc, bt_row, kvh, HK,
                           BN, PAGE, HEAD_DIM, V_KEYS)
            rows = gl.arange(0, BM, layout=gl.SliceLayout(1, a_layout))
            cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, a_layout))
            q_off = gl.expand_dims(q_start.to(gl.int64) * stride_qt + (kvh * GROUP + rows) * stride_qh, 1) + \
                gl.expand_dims(cols, 0)
            q = gl.load(q_ptr + q_off, mask=gl.expand_dims(rows < GROUP, 1), other=0.0).to(gl.float16)

            m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
            l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, mma))
            acc = gl.zeros([BM, HEAD_DIM], gl.float32, mma)
            for i in range(n_tiles):
                nxt = i + STAGES - 1  # into the slot every warp finished with last iteration (the barrier below)
                if nxt < n_tiles:
                    _issue(nxt, ready.index(nxt % STAGES), k_ring.index(nxt % STAGES), v_ring.index(nxt % STAGES),
                           kc_desc, vc_desc, bt_row, kvh, HK, BN, PAGE, HEAD_DIM, V_KEYS)
                m_i, l_i, acc = _tile_math(i, i % STAGES, q, m_i, l_i, acc, ctx, qk_scale, k_ring, v_ring, ready,
                                           BN, STAGES, V_KEYS, mma, a_layout, b_layout)
                gl.thread_barrier()  # every warp is done with the slot before the next iteration refills it

            out = acc * gl.expand_dims(v_scale / l_i, 1)
            o_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
            o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, mma))
            o_off = gl.expand_dims(q_start.to(gl.int64) * stride_ot + (kvh * GROUP + o_rows) * stride_oh, 1) + \
                gl.expand_dims(o_cols, 0)
            gl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(o_rows < GROUP, 1))


# TMA descriptors of each cache tensor, dropped when the tensor is: building one costs host time (~10-20 us), and
# eager steps (decode rows beside prompt chunks) would pay it per layer per step. Keyed by id() with the object
# checked through a weak reference (a WeakKeyDictionary would compare tensors with ==, elementwise).
_DESCRIPTORS: dict[int, tuple] = {}


def _descriptor(cache: torch.Tensor, keys_along_rows: bool):
    """The cache as [blocks * page, Hk * D] (box BLOCK_N x D), or V keys-fastest as [blocks * Hk * D, page] (box
    D x BLOCK_N)."""
    nb, page, hk, d = cache.shape
    key = (cache.data_ptr(), tuple(cache.shape), tuple(cache.stride()), keys_along_rows)
    hit = _DESCRIPTORS.get(id(cache))
    if hit is not None and hit[0]() is cache and hit[1] == key:
        return hit[2]
    if keys_along_rows:
        shape, box = (nb * hk * d, page), [d, BLOCK_N]
    else:
        shape, box = (nb * page, hk * d), [BLOCK_N, d]
    # a tensor on the cache's storage that is not a view of the cache object (a view would keep it alive)
    view = torch.empty(0, dtype=cache.dtype, device=cache.device).set_(
        cache.untyped_storage(), cache.storage_offset(), shape, (shape[1], 1))
    desc = TensorDescriptor(view, list(view.shape), [view.stride(0), 1], box, _smem_layout(*box))
    if hit is None or hit[0]() is not cache:  # a new tensor (maybe at a dead one's id): drop the entry with it
        weakref.finalize(cache, _DESCRIPTORS.pop, id(cache), None)
    _DESCRIPTORS[id(cache)] = (weakref.ref(cache), key, desc)
    return desc


@functools.cache
def _smem_layout(rows: int, cols: int):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float8e4nv)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, out: torch.Tensor, *,
                     k_scale: float = 1.0, v_scale: float = 1.0, stages: int = STAGES) -> None:
    """Write out's one-query rows (decode); longer rows are left to the caller.

    Arguments as spool.kernels.paged_attention's (already checked there); block_tables with unit column stride,
    seq_lens / query_start_loc int32, at most MAX_SEQS sequences. Call only where supported() holds. stages: the
    depth of the TMA ring.
    """
    _, hq, d = q.shape
    _, page, hk, _ = k_cache.shape
    keys = v_keys_fastest(v_cache)
    log2e = 1.4426950408889634
    _decode_kernel[(hk, seq_lens.shape[0])](
        q, out, _descriptor(k_cache, False), _descriptor(v_cache, keys), block_tables, seq_lens.to(torch.int32),
        query_start_loc.to(torch.int32), scale * k_scale * log2e, v_scale, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), block_tables.stride(0), GROUP=hq // hk, HK=hk, BM=BLOCK_M, BN=BLOCK_N, PAGE=page,
        HEAD_DIM=d, STAGES=stages, V_KEYS=keys, num_warps=4,
    )
