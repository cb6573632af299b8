"""Paged attention: one Triton kernel for decode steps and prefill chunks over a cached prefix.

Computes spool.kernels.reference.paged_attention: for sequence s with L new queries and context C =
seq_lens[s], query i sits at position C - L + i and attends (causally) to keys 0 .. C - L + i, read
from the paged caches through block_tables[s]. Softmax is online, in float32, base 2.

Layouts (any strides unless noted; the head_dim stride is normally 1):
  q            [T, Hq, D]                          may be a view into a fused qkv tensor
  k/v_cache    [num_blocks, block_size, Hk, D]     token t of seq s: block block_tables[s, t // bs], row t % bs;
                                                   q's dtype, or float8_e4m3fn (stored x / k_scale, x / v_scale)
  block_tables [S, max_blocks] int32               row stride passed, column stride must be 1
  seq_lens [S], query_start_loc [S + 1]            int32 (int64 accepted)
  out          [T, Hq, D]                          q's dtype; contiguous unless `out=` is given
  split-KV scratch: acc [T, Hq, splits, D] fp32 (unnormalized), m/l [T, Hq, splits] fp32

Work split: one program = (query tile, KV head, KV split). A query tile is BLOCK_Q tokens of one
sequence times the GROUP = Hq // Hk query heads that share the KV head, flattened into BLOCK_M
rows (row r -> token r // GROUP, head r % GROUP), so each K/V tile is loaded once per head group
and feeds tl.dot with M = BLOCK_M >= 16 (padded rows are masked). Decode uses BLOCK_Q = 1: one-query
sequences always run in a launch of decode tiles, also beside prompt chunks (a second launch). A KV
tile is BLOCK_N tokens spanning several pages; page ids are gathered from the block table per
token. Tiles entirely below the tile's first query position run without masks; the rest (causal
diagonal, partial last page) run masked; tiles past the last query's position are skipped.

Prompt chunks (sequences with more than one query) given the step's own keys and values (k_new / v_new, the
fused qkv's views, also written to the caches) read them contiguously: a query tile first takes its sequence's cached
prefix through the pages (every key visible, unmasked but for the prefix's partial last tile), then its own chunk's
keys 0 .. its last query from k/v_new (unmasked below the tile's first query, causal on the diagonal), by
pointer loads or, with AttnConfig.new_kv_tma, bulk tensor copies. No per-token page gather for the new keys,
and with an fp8 cache they stay unquantized (k_scale and v_scale apply to the prefix only; as SGLang's extend
attention). Such steps never split KV. On the H200 this took prefill of 2048 fresh tokens from 56% to 76% of
SDPA causal (bf16 KV) and from 46% to 72% (fp8 KV); bench/attn_workload.py. On Hopper, paged_attention hands
these chunks to spool.kernels.prefill_hopper (Gluon, FlashAttention-3's overlap: 95-99% of SDPA causal at 2048)
when it supports the call (and the Triton release: 3.6) and no config is forced; SPOOL_PREFILL_KERNEL=triton keeps
them here.

Finding the sequence of a tile needs no host sync: in decode (max_query_len <= 1) tile s is
sequence s; otherwise the grid has T // BLOCK_Q + S tile slots (an upper bound on
sum_s cdiv(L_s, BLOCK_Q)) and sequence s owns slots from query_start_loc[s] // BLOCK_Q + s, found
by binary search (spool.kernels.tile_slots); a sequence's later (longer) query tiles get the lower slots, so they
start first.
Split-KV (flash-decoding): when (tile slots x Hk) programs cannot fill the GPU, each tile's keys are
cut into num_splits ranges of whole KV tiles, sized on the device from that tile's own context
(so a CUDA graph captured with any max_seq_len stays correct and short contexts still spread);
a second small kernel merges the partial (acc, max, sum) triples. See default_config and
choose_num_splits for the numbers.

On Hopper, decode rows over an fp8 cache run spool.kernels.decode_hopper instead (Gluon: K/V pages through a TMA
ring; on the H200 the llama3-8b workload's contexts in 17% less time, B=64 x 4096 at x1.77-1.81 of SDPA on bf16 KV) when
it supports the call, the rows fill the GPU without split-KV, and there are at most decode_hopper.MAX_SEQS of them;
SPOOL_DECODE_KERNEL=triton keeps them here.

FP8 caches: K and V tiles load as e4m3 (half the bytes) and widen in registers, which is exact (every
e4m3 value is a bf16 and an fp16 value). With a bf16 q they widen to fp16, not bf16: Hopper converts
e4m3 pairs to fp16 pairs in one instruction (cvt.rn.f16x2.e4m3x2) while bf16 takes three more, and at
decode rates the conversions, not the bytes, were the limit (x0.99 of SDPA on bf16 KV instead of ~x2).
q is rounded to fp16 once per program (exact for |q| in [2**-14, 65504]: fp16 has 3 more mantissa bits
than bf16 but a narrower exponent; smaller magnitudes lose bits, larger ones would overflow, and no
trained model's queries come near either end) and P is rounded to fp16 before P @ V. An fp8 cache never
holds NaN (spool.kernels.kv_layout), so its masks are per page: a page holding a live key loads whole (its dead
rows' scores are -inf and p is 0), and loads stay 16 bytes wide along the keys too when V is stored
keys-fastest (spool.kernels.kv_layout). Other caches may hold NaN past a context and keep per-key masks. The
dequantization x * scale is folded in where it costs nothing: k_scale into the softmax scale
(q . (k8 * ks) = (q . k8) * ks) and v_scale into the final normalization (sum p (v8 * vs) = vs * sum p v8).

Numerics: fp16/bf16 dots on tensor cores with P rounded to the V dtype before P @ V (as in
FlashAttention); fp32 dots use tf32x3 (~fp32 accuracy, not plain tf32). Under TRITON_INTERPRET
bf16 dots run in fp32 because the interpreter mis-multiplies bf16.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from spool.kernels import decode_hopper, prefill_hopper
from spool.kernels.fp8 import FP8_DTYPE, is_fp8
from spool.kernels.interpreter import interpreting
from spool.kernels.kv_layout import v_keys_fastest
from spool.kernels.sizes import cdiv, next_power_of_2
from spool.kernels.tile_slots import find_seq


@dataclass(frozen=True, slots=True)
class AttnConfig:
    """Launch parameters; block_m rows = block_q query tokens x group heads (decode: block_q 1)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    fp8_f16_dot: bool = True  # fp8 caches with bf16 q: widen K/V to fp16 (one cvt per 2 values), q to fp16 once
    # k/v_new tiles (prefill) by bulk tensor copies (TMA, Hopper+) instead of pointer loads. Off: on the H200 the
    # pointer loads were as fast or faster at 2048 (+0) and on a real 8k-token step (bench/RESULTS.md, fourth session).
    new_kv_tma: bool = False
    # KV loops as tl.range(..., warp_specialize=True): Triton splits loads and math into warp groups where the
    # backend supports it. Off: on the H200 with Triton 3.6 it changed no decode time (bench/RESULTS.md, ninth
    # session); bench/attn_workload.py --warp-specialize times it again on another toolchain.
    warp_specialize: bool = False


# Prompt chunks with k/v_new on Hopper run spool.kernels.prefill_hopper (Gluon, FlashAttention-3's overlap) where it
# supports the call; SPOOL_PREFILL_KERNEL=triton keeps them on this file's kernel (A/B benchmarks).
USE_HOPPER_PREFILL = os.environ.get("SPOOL_PREFILL_KERNEL", "auto") != "triton"
# Decode rows over an fp8 cache on Hopper run spool.kernels.decode_hopper (Gluon, a TMA ring) where it supports the
# call and the rows fill the GPU without split-KV; SPOOL_DECODE_KERNEL=triton keeps them here (A/B benchmarks).
USE_HOPPER_DECODE = os.environ.get("SPOOL_DECODE_KERNEL", "auto") != "triton"
_MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (q load, partial write) dominates
_MAX_SPLITS = 64
_PROGRAMS_PER_SM = 2  # programs per SM that keep HBM busy (each has a ~32 KB K+V tile in flight; ~4 fit)


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b (+ acc, accumulated in place by the MMA: no second fp32 tile live in registers)."""
    # UPCAST: the CPU interpreter mis-multiplies bf16 (numpy sees raw uint16), so go through fp32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:  # fp32 inputs: ~fp32 accuracy on tensor cores (3 tf32 MMAs), not plain tf32
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, lo, hi, ctx, q_pos, qk_scale,
                stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
                MASKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, WS: tl.constexpr,
                FINITE_V: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        if FINITE_V:  # every caller's lo is a multiple of BLOCK_N or equals hi (no iteration): see `live`
            start = tl.multiple_of(start, BLOCK_N)
        offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        in_ctx = offs_n < ctx
        if FINITE_V:
            # Masks per page (a page holding any live key loads whole): with the alignment hint they stay constant
            # over whole loads, so loads stay 16 bytes wide along the keys too (V stored keys-fastest:
            # spool.kernels.kv_layout). Other caches keep per-key masks: their kernel is unchanged.
            live = offs_n // PAGE * PAGE < ctx
        else:
            live = in_ctx
        if PAGE >= BLOCK_N:  # the tile lies in one page (tiles start at multiples of BLOCK_N): one id, no gather
            page = tl.load(bt_row + start // PAGE).to(tl.int64)  # start < hi <= ctx: a live page
            row = start % PAGE + tl.arange(0, BLOCK_N)
        else:
            if MASKED:
                page = tl.load(bt_row + offs_n // PAGE, mask=live, other=0)
            else:
                page = tl.load(bt_row + offs_n // PAGE)
            page = page.to(tl.int64)  # block offsets can pass 2**31 elements
            row = offs_n % PAGE
        # K tiles load transposed, [HEAD_DIM, BLOCK_N], ready for q @ k; V tiles as [BLOCK_N, HEAD_DIM] for p @ v.
        k_row = page * stride_kb + row * stride_kt  # [BLOCK_N] element offsets of each key's row
        v_row = page * stride_vb + row * stride_vt
        k_off = k_row[None, :] + offs_d[:, None] * stride_kd
        v_off = v_row[:, None] + offs_d[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_base + k_off, mask=live[None, :], other=0.0)
            if FINITE_V:  # every stored value is finite, so a dead row's p = 0 zeroes it: whole pages (wide loads)
                v = tl.load(v_base + v_off, mask=live[:, None], other=0.0)
            else:  # rows past the context may hold NaN garbage (0 * NaN = NaN): never let them reach the dots
                v = tl.load(v_base + v_off, mask=in_ctx[:, None], other=0.0)
        else:
            k = tl.load(k_base + k_off)
            v = tl.load(v_base + v_off)
        k = k.to(q.dtype)  # fp8 caches widen here, exactly; a no-op otherwise
        v = v.to(q.dtype)
        s = _mm(q, k, None, IEEE, UPCAST)  # [BLOCK_M, BLOCK_N], unscaled
        if MASKED:
            s = tl.where((offs_n[None, :] <= q_pos[:, None]) & in_ctx[None, :], s, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, qk_scale, MASKED, IEEE, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one tile of unscaled scores s [BLOCK_M, BLOCK_N] (-inf where masked) and its V into (acc, l, m)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units (qk_scale > 0 keeps -inf, max order)
    # A row may see no key yet (split range past its causal limit): exponentiate against 0
    # then, so exp2 gives 0 instead of NaN, while m_i stays -inf.
    if MASKED:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.math.exp2(s * qk_scale - m_ref[:, None])  # one FMA per score
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], IEEE, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _new_kv_tiles(acc, l_i, m_i, q, kn_base, vn_base, q_len, qi, lo, hi, qk_scale, stride_knt, stride_knd,
                  stride_vnt, stride_vnd, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr, WS: tl.constexpr):
    """Keys lo..hi of the step's own tokens, read from the contiguous k/v_new rows of the sequence (row j is
    its query j's key): no page gather, and with TMA one bulk tensor copy per tile. Row qi sees keys j <= qi."""
    offs_d = tl.arange(0, HEAD_DIM)
    if TMA:  # rows past q_len read as zeros (the descriptor's bounds); the causal mask drops them anyway
        k_desc = tl.make_tensor_descriptor(kn_base, shape=[q_len, HEAD_DIM], strides=[stride_knt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(vn_base, shape=[q_len, HEAD_DIM], strides=[stride_vnt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        offs_n = start + tl.arange(0, BLOCK_N)
        if TMA:
            k = k_desc.load([start, 0]).T
            v = v_desc.load([start, 0])
        else:
            k_off = offs_n[None, :] * stride_knt + offs_d[:, None] * stride_knd
            v_off = offs_n[:, None] * stride_vnt + offs_d[None, :] * stride_vnd
            if MASKED:
                k = tl.load(kn_base + k_off, mask=(offs_n < q_len)[None, :], other=0.0)
                v = tl.load(vn_base + v_off, mask=(offs_n < q_len)[:, None], other=0.0)
            else:
                k = tl.load(kn_base + k_off)
                v = tl.load(vn_base + v_off)
        s = _mm(q, k, None, IEEE, UPCAST)
        if MASKED:
            s = tl.where(offs_n[None, :] <= qi[:, None], s, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, qk_scale, MASKED, IEEE, UPCAST)
    return acc, l_i, m_i


# Batch-dependent ints stay unspecialized so changing batches never trigger recompiles (Triton specializes an
# int on == 1 and % 16 == 0): the block table's row stride is the step's longest table, so it changes too.
@triton.jit(do_not_specialize=["num_seqs", "num_splits", "stride_bt"])
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, kn_ptr, vn_ptr,
    bt_ptr, seq_lens_ptr, qsl_ptr, qk_scale, v_scale, new_qk_scale, num_seqs, num_splits,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd, stride_bt,
    stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, ONE_QUERY_PER_SEQ: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, F16_DOT: tl.constexpr, NEW_KV: tl.constexpr, TMA: tl.constexpr,
    WS: tl.constexpr, FINITE_V: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_QUERY_PER_SEQ:  # decode tiles: tile s is sequence s, served if it has exactly one query
        seq = tile
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        if q_len > 1:  # a prompt chunk: the other launch's
            return
        q0 = 0
    else:
        seq = find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q)
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        if BLOCK_Q == 1:
            local = tile - q_start
        else:
            local = tile - (q_start // BLOCK_Q + seq)
        # Later query tiles see more keys: launch them first so the last wave holds the short ones.
        q0 = (tl.cdiv(q_len, BLOCK_Q) - 1 - local) * BLOCK_Q
        if local * BLOCK_Q >= q_len or q_len <= 1:  # past the chunk, or a one-query row (decode tiles serve it)
            return
    if q0 >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qi = q0 + offs_m // GROUP  # [BLOCK_M] query index within the sequence
    head = kvh * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (qi < q_len)
    tok = q_start + qi
    q_pos = ctx - q_len + qi
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    if F16_DOT:  # fp8 K/V widen to q's dtype inside the loop: make that fp16, the one-instruction conversion
        q_kv = q.to(tl.float16)
    else:
        q_kv = q
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt

    if NEW_KV:  # the cached prefix from the pages (every row sees all of it), then the step's own keys
        prefix = ctx - q_len
        whole = prefix // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q_kv, k_base, v_base, bt_row, 0, whole, prefix, q_pos, qk_scale,
                                    stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                                    BLOCK_N, PAGE, HEAD_DIM, False, IEEE, UPCAST, WS, FINITE_V)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q_kv, k_base, v_base, bt_row, whole, prefix, prefix, q_pos,
                                    qk_scale, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                                    BLOCK_N, PAGE, HEAD_DIM, True, IEEE, UPCAST, WS, FINITE_V)
        acc = acc * v_scale  # the cache's V scale (1 unless fp8); the new rows are unscaled
        kn_base = kn_ptr + q_start.to(tl.int64) * stride_knt + kvh.to(tl.int64) * stride_knh
        vn_base = vn_ptr + q_start.to(tl.int64) * stride_vnt + kvh.to(tl.int64) * stride_vnh
        n_mid = (q0 + 1) // BLOCK_N * BLOCK_N  # keys <= q0 are visible to every row of the tile
        n_end = tl.minimum(q0 + BLOCK_Q, q_len)
        acc, l_i, m_i = _new_kv_tiles(acc, l_i, m_i, q, kn_base, vn_base, q_len, qi, 0, n_mid, new_qk_scale,
                                      stride_knt, stride_knd, stride_vnt, stride_vnd,
                                      BLOCK_N, HEAD_DIM, False, TMA, IEEE, UPCAST, WS)
        acc, l_i, m_i = _new_kv_tiles(acc, l_i, m_i, q, kn_base, vn_base, q_len, qi, n_mid, n_end, new_qk_scale,
                                      stride_knt, stride_knd, stride_vnt, stride_vnd,
                                      BLOCK_N, HEAD_DIM, True, TMA, IEEE, UPCAST, WS)
        out = acc / l_i[:, None]
        o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        return

    first_pos = ctx - q_len + q0  # keys <= first_pos are visible to every row of the tile
    kv_end = ctx - q_len + tl.minimum(q0 + BLOCK_Q, q_len)  # one past the last row's position
    if SPLIT:  # this program's share of the tile's keys, in whole KV tiles (sized on device: graph-safe)
        per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, kv_end)
    else:
        lo = 0
        hi = kv_end
    mid = tl.maximum(tl.minimum((first_pos + 1) // BLOCK_N * BLOCK_N, hi), lo)
    if FINITE_V:
        mid = tl.multiple_of(mid, BLOCK_N)  # or mid == hi, where the masked loop has no iteration
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q_kv, k_base, v_base, bt_row, lo, mid, ctx, q_pos, qk_scale,
                                stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                                BLOCK_N, PAGE, HEAD_DIM, False, IEEE, UPCAST, WS, FINITE_V)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q_kv, k_base, v_base, bt_row, mid, hi, ctx, q_pos, qk_scale,
                                stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                                BLOCK_N, PAGE, HEAD_DIM, True, IEEE, UPCAST, WS, FINITE_V)

    if not SPLIT:
        out = acc * (v_scale / l_i)[:, None]
        o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Every (token, head, split) gets m and l, empty splits included (m = -inf, l = 0).
        part = (tok.to(tl.int64) * (GROUP * tl.num_programs(1)) + head) * num_splits + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc * v_scale, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, stride_ot, stride_oh, stride_od,
                         num_splits, SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    base = (tok.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.load(part_m_ptr + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    l = tl.load(part_l_ptr + base + offs_s, mask=offs_s < num_splits, other=0.0)
    live = m > float("-inf")
    w = tl.where(live, tl.math.exp2(m - tl.max(m, 0)), 0.0)  # [SPLITS_P2]
    acc = tl.load(part_acc_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=live[:, None], other=0.0)  # [SPLITS_P2, HEAD_DIM]
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    o_off = tok.to(tl.int64) * stride_ot + head * stride_oh + offs_d * stride_od
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty))


def default_config(decode: bool, head_dim: int, group: int, dtype: torch.dtype, kv_fp8: bool = False,
                   v_keys_fastest_pages: bool = False) -> AttnConfig:
    """Tile sizes for q's dtype: decode streams ~16 KB K/V tiles; prefill uses 128-row tiles (64 for fp32).

    fp8 caches use the same token counts per tile (K/V widen in registers, so register use follows the
    token count, not the bytes loaded); in decode their half-size tiles need a deeper pipeline to keep as
    many bytes in flight.
    """
    wide = dtype == torch.float32  # fp32 tiles take twice the shared memory
    group_rows = max(16, next_power_of_2(group))
    if decode:
        block_n = max(16, (8192 if not wide else 4096) // head_dim)
        if wide:
            return AttnConfig(block_m=group_rows, block_n=block_n, num_warps=4, num_stages=3)
        # Measured on H200 (bench/kernel_speeds.py --sweep, bench/RESULTS.md): 2 warps x 4 stages keeps more K/V
        # tiles in flight per SM than 4 x 3 and reaches copy bandwidth (101% vs 71%) at B=64, ctx=4096.
        # fp8 KV (same sweep, 2026-12-02 third session): 6 stages 146 µs vs 4 stages 173 µs at block 64.
        if kv_fp8 and v_keys_fastest_pages:  # fp8 V stored keys-fastest in pages of >= 64 (spool.kernels.kv_layout):
            # 128-key tiles, 2 warps x 4 stages measured best at block 64 (B=64 x 4096: 144.5 us, x1.767 of SDPA,
            # against 151.6 us row-major; the workload's contexts: 199.4 against 214.7 us; bench/RESULTS.md)
            return AttnConfig(block_m=group_rows, block_n=min(128, 16384 // head_dim), num_warps=2, num_stages=4)
        return AttnConfig(block_m=group_rows, block_n=block_n, num_warps=2, num_stages=6 if kv_fp8 else 4)
    if wide:
        return AttnConfig(block_m=max(32, group_rows), block_n=32, num_warps=4, num_stages=2)
    return AttnConfig(block_m=max(128, group_rows), block_n=64 if head_dim <= 128 else 32, num_warps=8, num_stages=3)


def keys_fastest_pages(v_cache: torch.Tensor) -> bool:
    """V stored keys-fastest (spool.kernels.kv_layout) in pages of >= 64 tokens: default_config's 128-key fp8 tiles."""
    return v_keys_fastest(v_cache) and v_cache.shape[1] >= 64


def choose_num_splits(programs: int, max_seq_len: int, block_n: int, num_sms: int) -> int:
    """Split-KV factor: enough programs to fill the SMs, each split keeping >= 256 keys."""
    target = _PROGRAMS_PER_SM * num_sms
    if programs >= target:
        return 1
    by_len = cdiv(max_seq_len, max(_MIN_TOKENS_PER_SPLIT, block_n))
    return max(1, min(cdiv(target, programs), by_len, _MAX_SPLITS))


def _fills_gpu(programs: int, device: torch.device) -> bool:
    """Enough programs to keep every SM's memory traffic going without split-KV (choose_num_splits's target)."""
    return programs >= _PROGRAMS_PER_SM * _num_sms(device)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so CPU tests still exercise split-KV


def _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("paged_attention: want q [T, Hq, D] and k/v_cache [blocks, block_size, Hk, D] of one "
                         f"shape; got q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    _, hq, d = q.shape
    _, bs, hk, dk = k_cache.shape
    if dk != d or hq % hk:
        raise ValueError(f"paged_attention: head_dim {d} vs cache {dk}, or Hq={hq} not a multiple of Hk={hk}")
    if d < 16 or d & (d - 1) or bs & (bs - 1):
        raise ValueError(f"paged_attention: head_dim ({d}, >= 16) and block_size ({bs}) must be powers of 2")
    if (q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k_cache.dtype != v_cache.dtype
            or k_cache.dtype not in (q.dtype, FP8_DTYPE)):
        raise TypeError(f"paged_attention: q must be fp16/bf16/fp32 and the k/v caches q's dtype or float8_e4m3fn; "
                        f"got dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"paged_attention: {name} must be int32 or int64, got {t.dtype}")
    s = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != s or query_start_loc.shape != (s + 1,):
        raise ValueError(f"paged_attention: block_tables {tuple(block_tables.shape)}, "
                         f"seq_lens {tuple(seq_lens.shape)}, query_start_loc {tuple(query_start_loc.shape)} "
                         "disagree on the number of sequences")
    devs = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)}
    if len(devs) != 1:
        raise ValueError(f"paged_attention: all tensors must be on one device, got {sorted(map(str, devs))}")


def _check_new_kv(q, k_cache, k_new, v_new) -> None:
    t, _, d = q.shape
    want = (t, k_cache.shape[2], d)
    if v_new is None or k_new.shape != want or v_new.shape != want or k_new.dtype != q.dtype or v_new.dtype != q.dtype:
        raise ValueError(f"paged_attention: k_new and v_new must both be {want} {q.dtype}, got "
                         f"{None if k_new is None else (tuple(k_new.shape), k_new.dtype)} and "
                         f"{None if v_new is None else (tuple(v_new.shape), v_new.dtype)}")
    if k_new.device != q.device or v_new.device != q.device:
        raise ValueError("paged_attention: k_new and v_new must be on q's device")


def _tma_alloc(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for descriptors the kernel builds on the device (triton.set_allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ok(k_new: torch.Tensor, v_new: torch.Tensor, interp: bool) -> bool:
    """Bulk tensor copies need Hopper or later (or the interpreter), unit head_dim stride, 16-byte rows/bases."""
    if not interp:
        if k_new.device.type != "cuda" or torch.cuda.get_device_capability(k_new.device)[0] < 9:
            return False
    esz = k_new.element_size()
    for t in (k_new, v_new):
        if t.stride(2) != 1 or (t.stride(0) * esz) % 16 or (t.stride(1) * esz) % 16 or t.data_ptr() % 16:
            return False
    if not interp:
        triton.set_allocator(_tma_alloc)  # per thread (a context variable): set on the launching thread
    return True


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: AttnConfig | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton paged attention with spool.kernels.reference.paged_attention's semantics; returns [T, Hq, D].

    k_new / v_new [T, Hk, D] (q's dtype; views into the fused qkv are fine): the step's own keys and values,
    already written to the caches. Sequences with more than one query read their new keys from them,
    contiguous, instead of through the pages (see the reference for the fp8 case).

    A step with a prompt chunk (max_query_len > 1) runs two launches: the chunks with prefill tiles, then the
    one-query rows (the decodes riding along) with decode tiles, which read a row's context at decode speed
    instead of through a 128-row tile holding one query.

    Pass max_query_len / max_seq_len (host ints) to avoid device syncs: without them
    max_query_len is read back from query_start_loc, and max_seq_len from seq_lens when split-KV
    is considered. num_splits / config override the heuristics (benchmarks, tuning); in a prompt step they
    apply to the prompt chunks' launch. fp8 caches are read as stored * k_scale / v_scale; other caches
    ignore the scales.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    if not is_fp8(k_cache.dtype):
        k_scale = v_scale = 1.0
    elif not (k_scale > 0 and v_scale > 0):
        raise ValueError(f"paged_attention: fp8 scales must be > 0, got k {k_scale}, v {v_scale}")
    t, hq, d = q.shape
    if out is None:
        out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"paged_attention: out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if t == 0 or seq_lens.shape[0] == 0:
        return out
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    seq_lens, query_start_loc = seq_lens.contiguous(), query_start_loc.contiguous()
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale, float(k_scale), float(v_scale))
    if max_query_len <= 1:
        if not _hopper_decode(*args, config, num_splits):
            _launch(*args, True, config, num_splits, max_seq_len, None, None)
        return out
    new_kv = k_new is not None
    if new_kv:
        _check_new_kv(q, k_cache, k_new, v_new)
        num_splits = 1  # the prefix-then-own-keys order has no split-KV form: one program per query tile
    # Prompt chunks first: a split launch's merge rewrites every row, and the one-query launch after it (never
    # split) rewrites its own rows.
    if new_kv and config is None and USE_HOPPER_PREFILL and prefill_hopper.supported(q, k_cache, v_cache, k_new, v_new):
        prefill_hopper.prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_new, v_new,
                                         scale, out, k_scale=k_scale, v_scale=v_scale)
    else:
        _launch(*args, False, config, num_splits, max_seq_len, k_new if new_kv else None, v_new if new_kv else None)
    if not _hopper_decode(*args, None, 1):
        _launch(*args, True, None, 1, max_seq_len, None, None)
    return out


def _hopper_decode(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale, k_scale, v_scale,
                   config: AttnConfig | None, num_splits: int | None) -> bool:
    """Run the one-query rows on spool.kernels.decode_hopper if it serves the call: no config forced, no split-KV
    wanted (num_splits 1, or rows x KV heads enough to fill the GPU, where _launch would not split), and no more
    sequences than its grid takes."""
    if (config is not None or not USE_HOPPER_DECODE or seq_lens.shape[0] > decode_hopper.MAX_SEQS
            or not decode_hopper.supported(q, k_cache, v_cache)):
        return False
    if num_splits is None:  # what _launch would choose
        num_splits = 1 if _fills_gpu(seq_lens.shape[0] * k_cache.shape[2], q.device) else 0
    if num_splits != 1:
        return False
    decode_hopper.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out,
                                   k_scale=k_scale, v_scale=v_scale)
    return True


def _launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale, k_scale, v_scale,
            one_query: bool, config: AttnConfig | None, num_splits: int | None, max_seq_len: int | None,
            k_new: torch.Tensor | None, v_new: torch.Tensor | None) -> None:
    """One kernel launch: the one-query sequences (decode tiles; sequence s is tile s) or the longer ones."""
    t, hq, d = q.shape
    _, page, hk, _ = k_cache.shape
    group = hq // hk
    s = seq_lens.shape[0]
    cfg = config or default_config(one_query, d, group, q.dtype, is_fp8(k_cache.dtype), keys_fastest_pages(v_cache))
    block_q = 1 if one_query else max(1, cfg.block_m // group)
    if cfg.block_m < block_q * group or cfg.block_m < 16:
        raise ValueError(f"paged_attention: block_m {cfg.block_m} cannot hold {group} heads (>= 16 rows)")
    tiles = s if one_query else (t if block_q == 1 else t // block_q + s)
    if num_splits is None:
        if _fills_gpu(tiles * hk, q.device):
            num_splits = 1
        else:
            if max_seq_len is None:
                max_seq_len = int(seq_lens.max())
            num_splits = choose_num_splits(tiles * hk, max_seq_len, cfg.block_n, _num_sms(q.device))
    num_splits = max(1, num_splits)
    part_acc = part_m = part_l = out  # unused when not splitting
    if num_splits > 1:
        part_acc = torch.empty((t, hq, num_splits, d), dtype=torch.float32, device=q.device)
        part_m = torch.empty((t, hq, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty((t, hq, num_splits), dtype=torch.float32, device=q.device)
    interp = interpreting()
    new_kv = k_new is not None
    tma = new_kv and cfg.new_kv_tma and _tma_ok(k_new, v_new, interp)
    if not new_kv:
        k_new = v_new = q  # unused
    log2e = 1.4426950408889634
    _paged_attn_kernel[(tiles, hk, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_m, part_l, k_new, v_new,
        block_tables, seq_lens, query_start_loc, scale * k_scale * log2e, v_scale, scale * log2e,
        s, num_splits,
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE=page, HEAD_DIM=d,
        SPLIT=num_splits > 1, ONE_QUERY_PER_SEQ=one_query,
        IEEE=q.dtype == torch.float32, UPCAST=interp and q.dtype == torch.bfloat16,
        F16_DOT=cfg.fp8_f16_dot and is_fp8(k_cache.dtype) and q.dtype == torch.bfloat16,
        NEW_KV=new_kv, TMA=tma, WS=cfg.warp_specialize and not interp, FINITE_V=is_fp8(k_cache.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(t, hq)](
            part_acc, part_m, part_l, out, *out.stride(), num_splits,
            SPLITS_P2=next_power_of_2(num_splits), HEAD_DIM=d, num_warps=4,
        )
