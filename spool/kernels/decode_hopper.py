"""Decode attention over an fp8 KV cache for Hopper in Gluon: K/V pages by TMA into a ring, tensor-core math.

Computes what spool.kernels.paged_attention computes for one-query rows (decode), for caches of fp8 e4m3 with
pages of >= BLOCK_N rows, V stored row-major or keys-fastest (spool.kernels.kv_layout). One program per
(sequence, KV head), one warpgroup: the GROUP query heads sharing the KV head are the rows of a 16-row tile
(mma.sync m16n8k16, the smallest tensor-core tile), so each K/V tile is read once per head group. The program
fills a ring of STAGES tile slots by TMA (one elected thread issues a K and a V copy per tile, STAGES - 1 tiles
ahead of the math), so no thread spends instructions on copies; K^T and V then load from shared memory straight
into mma operand registers (two e4m3 codes per 16-bit lane along the reduction: V row-major loads byte by byte,
keys-fastest two bytes at a time) and widen to fp16 there (one cvt per pair; exact for every e4m3 code). q is
rounded to fp16 once and P to fp16 before P @ V, as the Triton kernel does for fp8 caches with a bf16 q; k_scale
folds into the score scale and v_scale into the final normalization; the last tile's keys past the context are
masked (an fp8 cache never holds NaN, so its dead V rows only ever meet p = 0).

Measured on the H200 (bench/attn_workload.py --graphs, bench/RESULTS.md sixteenth session; 32/8 heads, d128, block
64), against the Triton kernel's fp8 decode tiles:
- the llama3-8b workload's contexts (512 x U[128,1024]): 187 us against 215 us (-13%), V row-major;
- B=64 x 4096: 145.6 us against 149.9 (x1.749 of SDPA on bf16 KV against x1.699); V keys-fastest 142.7 us (x1.785);
- llama3-8b, fp8 weights + fp8 KV, end to end: 14,935 tok/s against 14,473 (+3.2%, one pair, ring of 3).
Shallow rings win: at 2 or 3 slots (34 or 51 KB of shared memory) four programs share an SM and B=64 x 8 heads
runs in one wave; at 4 (67 KB) three do, and B=64 x 4096 took 205 us. Also measured and not kept: a fifth,
producer warp issuing the copies (warp specialization; 146.7-159.4 us), and each warp keeping its own softmax
state over a quarter of every tile (no cross-warp reductions, but four times the accumulator registers:
155-185 us).

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
# How a cache is stored, as the kernel's TMA reads it (one code per cache):
ROWS = 0  # token-major, row-major: [blocks, page, Hk, D] (the engine's), read as [blocks * page, Hk * D]
HEADS = 1  # head-major, row-major: [blocks, Hk, page, D] in memory, read as [blocks * Hk * page, D]
KEYS = 2  # V keys-fastest: [blocks, Hk, D, page] in memory, read as [blocks * Hk * D, page]


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
_VARIANT = os.environ.get("SPOOL_GLUON_DECODE_VARIANT", "base")  # an experiment: base, wide, heads, wide+heads


def storage(cache: torch.Tensor) -> int | None:
    """The cache's layout code (ROWS, HEADS or KEYS) for a [blocks, page, Hk, D] cache, or None if it is none."""
    if cache.is_contiguous():
        return ROWS
    if cache.permute(0, 2, 1, 3).is_contiguous():
        return HEADS
    if cache.permute(0, 2, 3, 1).is_contiguous():
        return KEYS
    return None


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
    if k_cache.data_ptr() % 16 or v_cache.data_ptr() % 16:
        return False
    return storage(k_cache) in (ROWS, HEADS) and storage(v_cache) is not None


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether decode_attention can serve this call: a Hopper GPU, a Triton release the Gluon kernels are written
    for (spool.kernels.prefill_hopper's checks, cached: this runs per layer per step), and layout_ok."""
    if q.device.type != "cuda" or not prefill_hopper._hopper(q.device) or not prefill_hopper._available_said():
        return False
    return layout_ok(q, k_cache, v_cache)


if gluon is not None:

    @gluon.constexpr_function
    def _bit_moved(layout, dim, moves):
        """layout (a DistributedLinearLayout) with bit b of coordinate dim moved to bit moves[b], and the register
        bases along dim first, lowest bit first: the layout to read a tile in when its elements are stored at the
        moved positions, so that a thread's elements lie together in memory."""
        def move(v):
            v = list(v)
            v[dim] = sum(1 << moves[b] for b in range(len(moves)) if v[dim] >> b & 1)
            return v

        reg = [move(v) for v in layout.reg_bases]
        along = sorted((v for v in reg if v[dim] and not any(x for j, x in enumerate(v) if j != dim)),
                       key=lambda v: v[dim])
        return gl.DistributedLinearLayout([*along, *(v for v in reg if v not in along)],
                                          [move(v) for v in layout.lane_bases], [move(v) for v in layout.warp_bases],
                                          layout.block_bases, layout.shape)

    @gluon.constexpr_function
    def _k_moves(d):
        """Where K^T's operand layout keeps a d bit (bit 0 in registers, 1-2 across lanes, the rest in registers),
        the shared tile is read with the register bits low: a thread's 2 * d / 8 bytes of a key are contiguous."""
        top = d.bit_length() - 1
        return [0, top - 2, top - 1, *range(1, top - 2)]

    @gluon.constexpr_function
    def _v_moves(d):
        """V's operand layout (d = 8 columns across lanes, 4 warps of 8, then registers) read with the register bits
        low: a thread's d / 32 bytes of a key row are contiguous."""
        nr = d.bit_length() - 1 - 5
        return [nr, nr + 1, nr + 2, nr + 3, nr + 4, *range(nr)]

    @gluon.jit
    def _k_wide(k_tile, b_layout: gl.constexpr, k_phys: gl.constexpr):
        """K^T [D, BN] of the shared tile in b_layout, d in _k_moves' order (q's columns follow it)."""
        d: gl.constexpr = k_tile.shape[1]
        bn: gl.constexpr = k_tile.shape[0]
        k_t = k_tile.permute((1, 0)).load(k_phys)
        k_t = k_t.reshape([4, d // 8, 2, bn]).permute((1, 0, 2, 3)).reshape([d, bn])
        return gl.convert_layout(k_t, b_layout, assert_trivial=True)

    @gluon.jit
    def _v_wide(v_tile, b_layout: gl.constexpr, v_phys: gl.constexpr):
        """V [BN, D] of a row-major shared tile in b_layout, d in _v_moves' order (the output's columns follow it)."""
        bn: gl.constexpr = v_tile.shape[0]
        d: gl.constexpr = v_tile.shape[1]
        v = v_tile.load(v_phys)
        v = v.reshape([bn, 4, 8, d // 32]).permute((0, 3, 1, 2)).reshape([bn, d])
        return gl.convert_layout(v, b_layout, assert_trivial=True)

    @gluon.jit
    def _copy(desc, page, pos, kvh, bar, dst, HK: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
              LAYOUT: gl.constexpr):
        """TMA load of one tile of a cache stored as LAYOUT: the page's keys pos.. of KV head kvh."""
        if LAYOUT == 0:  # ROWS: [blocks * page, Hk * D]
            tma.async_copy_global_to_shared(desc, [page * PAGE + pos, kvh * HEAD_DIM], bar, dst)
        elif LAYOUT == 1:  # HEADS: [blocks * Hk * page, D]
            tma.async_copy_global_to_shared(desc, [(page * HK + kvh) * PAGE + pos, 0], bar, dst)
        else:  # KEYS: [blocks * Hk * D, page], the head's D rows of the page, keys along them
            tma.async_copy_global_to_shared(desc, [(page * HK + kvh) * HEAD_DIM, pos], bar, dst)

    @gluon.jit
    def _issue(i, bar, k_dst, v_dst, kc_desc, vc_desc, bt_row, kvh, HK: gl.constexpr, BN: gl.constexpr,
               PAGE: gl.constexpr, HEAD_DIM: gl.constexpr, K_LAYOUT: gl.constexpr, V_LAYOUT: gl.constexpr):
        """TMA loads of key tile i (one page part) into k_dst / v_dst, completing on bar."""
        mbarrier.expect(bar, 2 * kc_desc.block_type.nbytes)
        pos = i * BN
        page = gl.load(bt_row + pos // PAGE).to(gl.int32)
        _copy(kc_desc, page, pos % PAGE, kvh, bar, k_dst, HK, PAGE, HEAD_DIM, K_LAYOUT)
        _copy(vc_desc, page, pos % PAGE, kvh, bar, v_dst, HK, PAGE, HEAD_DIM, V_LAYOUT)

    @gluon.jit
    def _tile_math(i, st, q, m_i, l_i, acc, ctx, qk_scale, k_ring, v_ring, ready, BN: gl.constexpr,
                   STAGES: gl.constexpr, V_LAYOUT: gl.constexpr, WIDE: gl.constexpr, mma: gl.constexpr,
                   a_layout: gl.constexpr, b_layout: gl.constexpr, k_phys: gl.constexpr, v_phys: gl.constexpr):
        """Key tile i (in slot st, once landed) folded into the online softmax (m_i, l_i) and acc."""
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        if WIDE:
            k_t = _k_wide(k_ring.index(st), b_layout, k_phys).to(gl.float16)
        else:
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
        if V_LAYOUT == 2:  # KEYS: the slot holds V^T
            v = v_ring.index(st).permute((1, 0)).load(b_layout).to(gl.float16)  # [BN, D]
        elif WIDE:
            v = _v_wide(v_ring.index(st), b_layout, v_phys).to(gl.float16)
        else:
            v = v_ring.index(st).load(b_layout).to(gl.float16)
        acc = mma_v2(p, v, acc * gl.expand_dims(alpha, 1))
        return m_new, l_i, acc

    # The block table's row stride changes with the batch: unspecialized, so new batches never recompile.
    @gluon.jit(do_not_specialize=["stride_bt"])
    def _decode_kernel(q_ptr, out_ptr, kc_desc, vc_desc, bt_ptr, seq_lens_ptr, qsl_ptr, qk_scale, v_scale,
                       stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, GROUP: gl.constexpr,
                       HK: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, PAGE: gl.constexpr,
                       HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, K_LAYOUT: gl.constexpr,
                       V_LAYOUT: gl.constexpr, WIDE: gl.constexpr, HEADS_FIRST: gl.constexpr):
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        k_phys: gl.constexpr = _bit_moved(gl.to_linear_layout(b_layout, [HEAD_DIM, BN]), 0, _k_moves(HEAD_DIM))
        v_phys: gl.constexpr = _bit_moved(gl.to_linear_layout(b_layout, [BN, HEAD_DIM]), 1, _v_moves(HEAD_DIM))
        seq = gl.program_id(1 if HEADS_FIRST else 0)
        kvh = gl.program_id(0 if HEADS_FIRST else 1)
        q_start = gl.load(qsl_ptr + seq)
        q_len = gl.load(qsl_ptr + seq + 1) - q_start
        if q_len == 1:  # a decode row (longer rows are prompt chunks: the prompt launch's; 0: idle)
            k_ring = gl.allocate_shared_memory(kc_desc.dtype, [STAGES, BN, HEAD_DIM], kc_desc.layout)
            if V_LAYOUT == 2:  # KEYS
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
                           BN, PAGE, HEAD_DIM, K_LAYOUT, V_LAYOUT)
            rows = gl.arange(0, BM, layout=gl.SliceLayout(1, a_layout))
            cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, a_layout))
            if WIDE:  # d in K^T's read order (_k_moves)
                cols = (cols & 1) + 2 * (cols >> 3) + (HEAD_DIM // 4) * ((cols >> 1) & 3)
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
                           kc_desc, vc_desc, bt_row, kvh, HK, BN, PAGE, HEAD_DIM, K_LAYOUT, V_LAYOUT)
                m_i, l_i, acc = _tile_math(i, i % STAGES, q, m_i, l_i, acc, ctx, qk_scale, k_ring, v_ring, ready,
                                           BN, STAGES, V_LAYOUT, WIDE, mma, a_layout, b_layout,
                                           k_phys, v_phys)
                gl.thread_barrier()  # every warp is done with the slot before the next iteration refills it

            out = acc * gl.expand_dims(v_scale / l_i, 1)
            o_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
            o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, mma))
            if WIDE and V_LAYOUT != 2:  # d in V's read order (_v_moves)
                o_cols = (o_cols >> 5) + (HEAD_DIM // 32) * (o_cols & 7) + (HEAD_DIM // 4) * ((o_cols >> 3) & 3)
            o_off = gl.expand_dims(q_start.to(gl.int64) * stride_ot + (kvh * GROUP + o_rows) * stride_oh, 1) + \
                gl.expand_dims(o_cols, 0)
            gl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(o_rows < GROUP, 1))


# TMA descriptors of each cache tensor, dropped when the tensor is: building one costs host time (~10-20 us), and
# eager steps (decode rows beside prompt chunks) would pay it per layer per step. Keyed by id() with the object
# checked through a weak reference (a WeakKeyDictionary would compare tensors with ==, elementwise).
_DESCRIPTORS: dict[int, tuple] = {}


def _descriptor(cache: torch.Tensor, layout: int):
    """The cache as its layout code reads it: ROWS [blocks * page, Hk * D] and HEADS [blocks * Hk * page, D] (box
    BLOCK_N x D), KEYS [blocks * Hk * D, page] (box D x BLOCK_N)."""
    nb, page, hk, d = cache.shape
    key = (cache.data_ptr(), tuple(cache.shape), tuple(cache.stride()), layout)
    hit = _DESCRIPTORS.get(id(cache))
    if hit is not None and hit[0]() is cache and hit[1] == key:
        return hit[2]
    if layout == KEYS:
        shape, box = (nb * hk * d, page), [d, BLOCK_N]
    elif layout == HEADS:
        shape, box = (nb * hk * page, d), [BLOCK_N, d]
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
                     k_scale: float = 1.0, v_scale: float = 1.0, stages: int = STAGES,
                     wide: bool = "wide" in _VARIANT, heads_first: bool = "heads" in _VARIANT) -> None:
    """Write out's one-query rows (decode); longer rows are left to the caller.

    Arguments as spool.kernels.paged_attention's (already checked there); block_tables with unit column stride,
    seq_lens / query_start_loc int32. Call only where supported() holds. stages: the depth of the TMA ring.
    """
    _, hq, d = q.shape
    _, page, hk, _ = k_cache.shape
    k_layout, v_layout = storage(k_cache), storage(v_cache)
    log2e = 1.4426950408889634
    grid = (hk, seq_lens.shape[0]) if heads_first else (seq_lens.shape[0], hk)
    _decode_kernel[grid](
        q, out, _descriptor(k_cache, k_layout), _descriptor(v_cache, v_layout), block_tables, seq_lens.to(torch.int32),
        query_start_loc.to(torch.int32), scale * k_scale * log2e, v_scale, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), block_tables.stride(0), GROUP=hq // hk, HK=hk, BM=BLOCK_M, BN=BLOCK_N, PAGE=page,
        HEAD_DIM=d, STAGES=stages, K_LAYOUT=k_layout, V_LAYOUT=v_layout, WIDE=wide,
        HEADS_FIRST=heads_first, num_warps=4,
    )
