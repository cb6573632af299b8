"""FP8 (e4m3) KV cache: the KV-write kernel and paged attention over fp8 caches vs spool.kernels.reference.

CPU under TRITON_INTERPRET=1 on odd shapes; real shapes (llama3-8b: 32 q / 8 kv heads, d128) with -m gpu.
Two kinds of bound:
- kernel vs reference on the same fp8 cache: both read identical e4m3 values, so only the compute
  rounding differs and q's dtype bound from tests/test_kernels.py applies (bf16 1e-2, fp16 2e-3, fp32 1e-5);
- fp8 vs the unquantized cache: e4m3 keeps 3 mantissa bits (relative rounding error <= 2**-4, ~2.4% RMS
  for uniformly spread mantissas); attention averages it over keys, so outputs stay within 5% (measured
  up to 4% on these random inputs, logits std 1.5).
"""
from __future__ import annotations

import math

import torch

from tests.test_kernels import DEVICE, TOL, assert_close, gpu, needs_cuda, poison, rel_err  # noqa: F401

import pytest  # noqa: E402

from spool.kernels import reference  # noqa: E402
from spool.kernels.fp8 import FP8_DTYPE, FP8_MAX, quantize  # noqa: E402
from spool.kernels.kv_layout import allocate_kv_cache  # noqa: E402
from spool.kernels.paged_attention import AttnConfig  # noqa: E402
from spool.kernels.triton_ops import TRITON_OPS as T  # noqa: E402

# e4m3 keeps 3 mantissa bits (a relative step of 1/8 near each power of two): measured 4% on the CPU shapes and
# 5.2% at the H200's b64 x 4k decode shape (2026-12-02); the exactness against the fp8 reference is checked apart.
FP8_VS_UNQUANTIZED = 0.07


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def keys_fastest(cache: torch.Tensor) -> torch.Tensor:
    """The same fp8 cache stored keys-fastest (spool.kernels.kv_layout's v_keys_fastest): [blocks, Hk, D,
    block_size]."""
    out = allocate_kv_cache(*cache.shape, cache.dtype, cache.device, v_keys_fastest=True)[1]
    bytes_of(out).copy_(bytes_of(cache))
    return out


# ---------------------------------------------------------------- KV write


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hk,d,bs", [(1, 64, 16), (8, 128, 16), (3, 64, 32)])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.05, 0.3)])
def test_write_kv_cache_fp8_matches_reference(hk, d, bs, dtype, k_scale, v_scale):
    """Bit-exact e4m3 codes vs the torch reference, with saturation past +-448 * scale and padding slots."""
    t, num_blocks = 11, 5
    kv = (torch.randn(t, 2 * hk + 1, d) * 3).to(dtype).to(DEVICE)
    kv[0, 0, :4] = torch.tensor([1e4, -1e4, 7.97 * k_scale, 1e-5])  # saturate both ways, round up a binade, subnormal
    kv[1, :, 5] = float("nan")  # stored as 0: an fp8 cache never holds NaN (spool.kernels.kv_layout)
    k, v = kv[:, :hk], kv[:, hk : 2 * hk]  # strided views, like the fused qkv
    slots = torch.randperm(num_blocks * bs)[:t]
    slots[[2, 7]] = -1
    slots = slots.to(DEVICE)
    kc = torch.zeros((num_blocks, bs, hk, d), dtype=FP8_DTYPE, device=DEVICE)
    vc = torch.zeros_like(kc)
    bytes_of(kc).fill_(0x7F)  # NaN codes: rows the kernel must not touch stay NaN
    bytes_of(vc).fill_(0x7F)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    reference.write_kv_cache(k, v, ref_kc, ref_vc, slots, k_scale, v_scale)
    T.write_kv_cache(k, v, kc, vc, slots, k_scale, v_scale)
    assert torch.equal(bytes_of(kc), bytes_of(ref_kc)) and torch.equal(bytes_of(vc), bytes_of(ref_vc))
    vc_keys = keys_fastest(torch.zeros_like(vc).view(torch.uint8).fill_(0x7F).view(FP8_DTYPE))
    T.write_kv_cache(k, v, kc, vc_keys, slots, k_scale, v_scale)
    assert torch.equal(bytes_of(vc_keys), bytes_of(ref_vc))  # same codes at the same (block, row, head, dim)
    written = bytes_of(ref_kc).view(-1, hk, d)[slots[slots >= 0]]
    assert (written != 0x7F).all() and (written != 0xFF).all()  # no NaN written; saturation, not overflow
    for cache in (ref_kc, ref_vc):
        if slots[1] >= 0:
            assert (bytes_of(cache).view(-1, hk, d)[slots[1], :, 5] == 0).all()  # NaN input stored as 0
    first = ref_kc.view(-1, hk, d)[slots[0]].float() if slots[0] >= 0 else None
    if first is not None:
        assert first[0, 0] == FP8_MAX and first[0, 1] == -FP8_MAX and first[0, 2] == 8.0


def test_reference_quantize_roundtrip_error():
    """Dequantized values are within half an e4m3 ulp (2**-4 relative) of the input inside the normal range."""
    x = torch.randn(4096) * 10
    scale = 0.07
    back = quantize(x, scale).float() * scale
    normal = ((x / scale).abs() >= 2**-6) & ((x / scale).abs() <= FP8_MAX)  # below: subnormal; above: saturated
    rel = ((back - x).abs() / x.abs())[normal]
    assert float(rel.max()) <= 2**-4 + 1e-6


def test_write_kv_cache_rejects_bad_scale():
    k = torch.randn(2, 1, 64, device=DEVICE)
    kc = torch.zeros(1, 16, 1, 64, dtype=FP8_DTYPE, device=DEVICE)
    with pytest.raises(ValueError, match="scales"):
        T.write_kv_cache(k, k, kc, kc.clone(), torch.tensor([0, 1], device=DEVICE), 0.0, 1.0)


# ---------------------------------------------------------------- paged attention over fp8 caches


def make_fp8_batch(seqs, hq, hk, d, bs, dtype, k_scale, v_scale, device=DEVICE, seed=0, v_keys_fastest=False):
    """seqs: [(query_len, context_len)]. Returns q (a view into a fused qkv), the fp8 caches, metadata, and
    the unquantized caches (q's dtype) holding the same K/V. Unused K rows hold NaN codes; unused V rows hold
    448, the largest finite code (an fp8 cache never holds NaN: spool.kernels.kv_layout), so a dead row that reached
    P @ V with any weight would show. V is row-major, as the engine stores it, or keys-fastest if asked."""
    torch.manual_seed(seed)
    nblocks = [math.ceil(c / bs) for _, c in seqs]
    num_blocks = sum(nblocks) + 3  # block 0 and two more stay unused (NaN)
    ids = (torch.randperm(num_blocks - 1) + 1)[: sum(nblocks)]
    bt = torch.zeros(len(seqs), max(nblocks) + 2, dtype=torch.int32)
    slots = []
    for s, (_, ctx) in enumerate(seqs):
        bt[s, : nblocks[s]] = ids[sum(nblocks[:s]) : sum(nblocks[: s + 1])]
        slots.append((bt[s, : nblocks[s]].long()[:, None] * bs + torch.arange(bs)).flatten()[:ctx])
    slots = torch.cat(slots).to(device)
    k_hi = torch.full((num_blocks, bs, hk, d), float("nan"), dtype=dtype, device=device)
    v_hi = torch.full_like(k_hi, float("nan"))
    # magnitudes near the scales' useful range: |x / scale| up to ~60, far from saturation
    k_hi.view(-1, hk, d)[slots] = (torch.randn(len(slots), hk, d, device=device) * 15 * k_scale).to(dtype)
    v_hi.view(-1, hk, d)[slots] = (torch.randn(len(slots), hk, d, device=device) * 15 * v_scale).to(dtype)
    k8 = torch.zeros(k_hi.shape, dtype=FP8_DTYPE, device=device)
    v8 = torch.zeros_like(k8)
    bytes_of(k8).fill_(0x7F)
    bytes_of(v8).fill_(0x7E)
    bytes_of(k8).view(-1, hk, d)[slots] = bytes_of(quantize(k_hi.view(-1, hk, d)[slots], k_scale))
    bytes_of(v8).view(-1, hk, d)[slots] = bytes_of(quantize(v_hi.view(-1, hk, d)[slots], v_scale))
    qlens = [ql for ql, _ in seqs]
    qkv = (torch.randn(sum(qlens), hq + 2 * hk, d, device=device) * 1.5 / (15 * k_scale)).to(dtype)  # logits std 1.5
    q = qkv[:, :hq]
    qsl = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    if v_keys_fastest:
        v8 = keys_fastest(v8)
    return q, k8, v8, bt.to(device), seq_lens.to(device), qsl.to(device), k_hi, v_hi


def new_rows(cache_hi, bt, seqs, bs):
    """The unquantized K or V rows of each sequence's new tokens, [T, Hk, D] (what the engine passes as k/v_new)."""
    hk, d = cache_hi.shape[2:]
    slots = [(bt[s, : math.ceil(c / bs)].long()[:, None] * bs + torch.arange(bs, device=bt.device)).flatten()[c - ql:c]
             for s, (ql, c) in enumerate(seqs)]
    return cache_hi.view(-1, hk, d)[torch.cat(slots)]


def check_fp8_attention(seqs, hq, hk, d, bs, dtype, k_scale=0.02, v_scale=0.1, device=DEVICE, new_kv=False,
                        v_keys_fastest=False, **kw):
    """new_kv: pass the new tokens' unquantized K/V as k/v_new (prompt steps read them instead of the fp8 rows)."""
    q, k8, v8, bt, sl, qsl, k_hi, v_hi = make_fp8_batch(seqs, hq, hk, d, bs, dtype, k_scale, v_scale, device,
                                                        v_keys_fastest=v_keys_fastest)
    scale = d**-0.5
    what = (f"fp8 paged_attention {seqs} hq={hq} hk={hk} d={d} bs={bs} {dtype} new_kv={new_kv} "
            f"v_keys_fastest={v_keys_fastest} {kw}")
    if new_kv:
        kw = kw | {"k_new": new_rows(k_hi, bt, seqs, bs), "v_new": new_rows(v_hi, bt, seqs, bs)}
    ref = reference.paged_attention(q, k8, v8, bt, sl, qsl, scale, k_scale=k_scale, v_scale=v_scale,
                                    k_new=kw.get("k_new"), v_new=kw.get("v_new"))
    out = T.paged_attention(q, k8, v8, bt, sl, qsl, scale, k_scale=k_scale, v_scale=v_scale, **kw)
    assert_close(out, ref, dtype, what)
    exact = reference.paged_attention(q, k_hi, v_hi, bt, sl, qsl, scale)  # what a bf16/fp32 cache would give
    err = rel_err(out, exact)
    assert err <= FP8_VS_UNQUANTIZED, f"{what}: fp8 vs unquantized rel err {err:.3e}"
    return err


DECODE = [(1, 1), (1, 17), (0, 9), (1, 150), (1, 64)]  # context 1, partial block, idle, several tiles, exact tiles
MIXED = [(1, 37), (20, 20), (13, 50), (0, 9), (45, 100)]  # decode, prefill, chunks over a cached prefix, idle


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp8_decode(dtype, group, d):
    check_fp8_attention(DECODE, 2 * group, 2, d, 16, dtype, max_query_len=1, max_seq_len=150)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp8_prefill_and_cached_prefix(dtype, group, d):
    check_fp8_attention(MIXED, 2 * group, 2, d, 16 if d == 64 else 32, dtype)


@pytest.mark.parametrize("bs", [16, 64])
def test_fp8_v_stored_keys_fastest_reads_right(bs):
    """Any V strides work: V stored keys-fastest (spool.kernels.kv_layout), tiles within one page and across pages."""
    check_fp8_attention(DECODE, 8, 2, 64, bs, torch.bfloat16, v_keys_fastest=True, max_query_len=1)
    check_fp8_attention(MIXED, 8, 2, 64, bs, torch.bfloat16, v_keys_fastest=True)
    check_fp8_attention(MIXED, 8, 2, 64, bs, torch.bfloat16, v_keys_fastest=True, new_kv=True)
    k, v = allocate_kv_cache(3, bs, 2, 64, FP8_DTYPE, DEVICE, v_keys_fastest=True)
    assert v.shape == k.shape and v.stride(1) == 1 and k.is_contiguous()


def test_fp8_dead_rows_of_a_live_page_add_nothing():
    """The last page is loaded whole: its rows past the context (448, the largest code) must get p = 0."""
    seqs = [(1, 17), (1, 30), (5, 21)]
    for keys_fastest_v in (False, True):
        err = check_fp8_attention(seqs, 8, 2, 64, 16, torch.float32, max_query_len=5, v_keys_fastest=keys_fastest_v)
        assert err < FP8_VS_UNQUANTIZED


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp8_prompt_steps_read_their_own_keys_unquantized(dtype, tma):
    """k/v_new: the prefix comes from the fp8 pages (k/v scales applied), the step's own keys from k/v_new."""
    cfg = AttnConfig(block_m=32, block_n=16, num_warps=4, num_stages=2, new_kv_tma=tma)
    with_new = check_fp8_attention(MIXED, 8, 2, 64, 16, dtype, new_kv=True, config=cfg)
    without = check_fp8_attention(MIXED, 8, 2, 64, 16, dtype, config=cfg)
    assert with_new < without  # fewer quantized keys: closer to the unquantized attention


def test_fp8_small_tiles_splits_and_unit_scales():
    """Many KV tiles, several query tiles per sequence, forced split-KV (v_scale goes through the merge)."""
    cfg = AttnConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
    check_fp8_attention(MIXED, 8, 2, 64, 16, torch.float32, config=cfg, num_splits=3)
    check_fp8_attention(DECODE, 8, 2, 64, 16, torch.float16, config=cfg, num_splits=2)
    check_fp8_attention(MIXED, 8, 2, 64, 16, torch.float16, k_scale=1.0, v_scale=1.0)


def test_fp8_cache_with_scales_differs_from_ignoring_them():
    """The scales are applied: reading the same fp8 cache with scale 1.0 gives a different answer."""
    q, k8, v8, bt, sl, qsl, _, _ = make_fp8_batch(MIXED, 4, 2, 64, 16, torch.float32, 0.02, 0.1)
    a = T.paged_attention(q, k8, v8, bt, sl, qsl, 0.125, k_scale=0.02, v_scale=0.1)
    b = T.paged_attention(q, k8, v8, bt, sl, qsl, 0.125)
    assert rel_err(b, a) > 0.5


def test_fp8_bad_inputs():
    q, k8, v8, bt, sl, qsl, _, _ = make_fp8_batch([(1, 5)], 4, 2, 64, 16, torch.float16, 0.1, 0.1)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        T.paged_attention(q, k8, v8.half(), bt, sl, qsl, 0.1)
    with pytest.raises(ValueError, match="scales"):
        T.paged_attention(q, k8, v8, bt, sl, qsl, 0.1, k_scale=-1.0)


def test_torch_backend_fp8_matches_triton():
    """The torch backend (spool.kernels.ops.TORCH_OPS) writes and reads fp8 caches like the Triton ops."""
    from spool.kernels.ops import TORCH_OPS

    hk, d, bs = 2, 64, 16
    k = torch.randn(20, hk, d, device=DEVICE)
    v = torch.randn(20, hk, d, device=DEVICE)
    slots = torch.arange(20, device=DEVICE)
    caches = [c for _ in range(2) for c in allocate_kv_cache(3, bs, hk, d, FP8_DTYPE, DEVICE)]
    TORCH_OPS.write_kv_cache(k, v, caches[0], caches[1], slots, 0.03, 0.05)
    T.write_kv_cache(k, v, caches[2], caches[3], slots, 0.03, 0.05)
    assert all(torch.equal(bytes_of(a), bytes_of(b)) for a, b in zip(caches[:2], caches[2:]))
    q = torch.randn(20, 4, d, device=DEVICE)
    bt = torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE)
    args = (q, caches[0], caches[1], bt, torch.tensor([20], dtype=torch.int32, device=DEVICE),
            torch.tensor([0, 20], dtype=torch.int32, device=DEVICE), 0.125)
    assert_close(T.paged_attention(*args, k_scale=0.03, v_scale=0.05),
                 TORCH_OPS.paged_attention(*args, k_scale=0.03, v_scale=0.05), torch.float32, "torch vs triton fp8")


# ---------------------------------------------------------------- real shapes (GPU tier)


@gpu
@needs_cuda
def test_gpu_fp8_decode_batch64_ctx4096():
    seqs = [(1, 4096 - 37 * (i % 5)) for i in range(64)]  # ragged ends: partial last blocks
    check_fp8_attention(seqs, 32, 8, 128, 16, torch.bfloat16, device="cuda", max_query_len=1, max_seq_len=4096)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch,ctx", [(1, 32768), (4, 8192)])
def test_gpu_fp8_decode_split_kv(batch, ctx):
    check_fp8_attention([(1, ctx)] * batch, 32, 8, 128, 16, torch.bfloat16, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("prefix", [0, 2048])
@pytest.mark.parametrize("d,bs", [(128, 16), (64, 32)])
def test_gpu_fp8_prefill_2048(prefix, d, bs):
    check_fp8_attention([(2048, 2048 + prefix)], 32, 8, d, bs, torch.bfloat16, device="cuda")
    check_fp8_attention([(2048, 2048 + prefix)], 32, 8, d, bs, torch.bfloat16, device="cuda", new_kv=True)


@gpu
@needs_cuda
def test_gpu_fp8_mixed_chunked_prefill():
    seqs = [(512, 3000), (2048, 2048), (1, 777)] + [(1, 4096)] * 30 + [(17, 4113), (0, 5)]
    check_fp8_attention(seqs, 32, 8, 128, 16, torch.bfloat16, device="cuda")
    check_fp8_attention(seqs, 32, 8, 128, 16, torch.bfloat16, device="cuda", new_kv=True)


@gpu
@needs_cuda
def test_gpu_fp8_write_kv_real_shapes():
    t, hk, d = 2048, 8, 128
    kv = torch.randn(t, 2 * hk, d, device="cuda", dtype=torch.bfloat16) * 4
    k, v = kv[:, :hk], kv[:, hk:]
    slots = torch.randperm(400 * 16, device="cuda")[:t]
    caches = [c for _ in range(2) for c in allocate_kv_cache(400, 16, hk, d, FP8_DTYPE, "cuda", v_keys_fastest=True)]
    reference.write_kv_cache(k, v, caches[0], caches[1], slots, 0.02, 0.04)
    T.write_kv_cache(k, v, caches[2], caches[3], slots, 0.02, 0.04)
    assert all(torch.equal(bytes_of(a), bytes_of(b)) for a, b in zip(caches[:2], caches[2:]))


# ---------------------------------------------------------------- the Hopper decode kernel (Gluon)


def test_hopper_decode_takes_fp8_caches_in_whole_tile_pages_only():
    from spool.kernels import decode_hopper as dh

    q = torch.zeros(2, 32, 128, dtype=torch.bfloat16)
    k, v = allocate_kv_cache(4, 64, 8, 128, FP8_DTYPE, "cpu")
    kf, vf = allocate_kv_cache(4, 64, 8, 128, FP8_DTYPE, "cpu", v_keys_fastest=True)
    assert dh.layout_ok(q, k, v) and dh.layout_ok(q, kf, vf) and dh.layout_ok(q.half(), k, v)
    assert not dh.layout_ok(q, *allocate_kv_cache(4, 16, 8, 128, FP8_DTYPE, "cpu"))  # pages of a quarter tile
    assert not dh.layout_ok(q, *allocate_kv_cache(4, 64, 8, 128, torch.bfloat16, "cpu"))  # not fp8
    assert not dh.layout_ok(q.float(), k, v)
    assert not dh.layout_ok(torch.zeros(2, 8, 96, dtype=torch.bfloat16), *allocate_kv_cache(4, 64, 1, 96, FP8_DTYPE,
                                                                                           "cpu"))  # head_dim 96
    q64 = torch.zeros(2, 64, 128, dtype=torch.bfloat16)
    assert not dh.layout_ok(q64, *allocate_kv_cache(4, 64, 2, 128, FP8_DTYPE, "cpu"))  # 32 query heads per KV head
    assert not dh.layout_ok(q[:, :16], k[:, :, :4], v[:, :, :4])  # a slice of the heads: rows not dense
    assert not dh.supported(q, k, v)  # CPU tensors: never


def test_hopper_decode_ring_depth_setting_is_checked():
    from spool.kernels.decode_hopper import _stages

    assert _stages("6") == 6 and _stages("2") == 2
    for bad in ("1", "11", "six", ""):
        with pytest.raises(ValueError, match="SPOOL_GLUON_DECODE_STAGES"):
            _stages(bad)


def test_hopper_decode_descriptors_are_kept_per_cache_tensor_and_dropped_with_it():
    import gc

    from spool.kernels import decode_hopper as dh

    if dh.gluon is None:
        pytest.skip("this Triton has no Gluon")
    k, v = allocate_kv_cache(4, 64, 8, 128, FP8_DTYPE, "cpu", v_keys_fastest=True)
    kd, vd = dh._descriptor(k, False), dh._descriptor(v, True)
    assert dh._descriptor(k, False) is kd and dh._descriptor(v, True) is vd  # built once per tensor
    assert list(kd.shape) == [4 * 64, 8 * 128] and list(kd.block_shape) == [64, 128]
    assert list(vd.shape) == [4 * 8 * 128, 64] and list(vd.block_shape) == [128, 64]  # V keys-fastest: keys along rows
    k2 = k.clone()
    assert dh._descriptor(k2, False) is not kd and dh._descriptor(k2, False).base.data_ptr() == k2.data_ptr()
    ids = {id(k), id(v), id(k2)}
    del k, v, k2, kd, vd
    gc.collect()
    assert not ids & dh._DESCRIPTORS.keys()  # dropped with their tensors (they hold the caches' memory)


def test_hopper_decode_takes_no_more_sequences_than_its_grid(monkeypatch):
    """The kernel's grid is (KV heads, sequences), and a grid's second axis stops at 65535: more go to Triton."""
    from spool.kernels import decode_hopper, paged_attention as pa

    calls = []
    monkeypatch.setattr(decode_hopper, "supported", lambda *a: True)
    monkeypatch.setattr(decode_hopper, "decode_attention", lambda *a, **kw: calls.append(a[4].shape[0]))
    monkeypatch.setattr(decode_hopper, "MAX_SEQS", 3)
    q = torch.zeros(4, 8, 64, dtype=torch.bfloat16)
    k, v = allocate_kv_cache(4, 64, 2, 64, FP8_DTYPE, "cpu")
    for n, served in ((3, True), (4, False)):
        bt = torch.zeros(n, 1, dtype=torch.int32)
        sl, qsl = torch.ones(n, dtype=torch.int32), torch.arange(n + 1, dtype=torch.int32)
        assert pa._hopper_decode(q[:n], k, v, bt, sl, qsl, q[:n], 0.125, 1.0, 1.0, None, 1) is served
    assert calls == [3]


def _hopper_decode_or_skip(q, k, v):
    from spool.kernels import decode_hopper

    if not decode_hopper.supported(q, k, v):
        pytest.skip("needs a Hopper GPU and a Triton release with the Gluon kernels")
    return decode_hopper


@gpu
@needs_cuda
@pytest.mark.parametrize("v_keys_fastest", [False, True], ids=["rowV", "keysV"])
@pytest.mark.parametrize("hq,hk,d,stages", [(32, 8, 128, 2), (8, 8, 64, 2), (64, 8, 128, 4), (16, 1, 128, 10),
                                             (32, 8, 128, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_hopper_decode_kernel_matches_the_reference(dtype, hq, hk, d, stages, v_keys_fastest):
    """Contexts of 1 key, partial and whole tiles, 4096 keys; an idle row and a prompt chunk's rows (left alone)."""
    seqs = [(1, 1), (1, 63), (1, 64), (1, 65), (0, 9), (1, 4096), (5, 200), (1, 1000), (1, 3001)]
    k_scale, v_scale = 0.02, 0.1
    q, k8, v8, bt, sl, qsl, k_hi, v_hi = make_fp8_batch(seqs, hq, hk, d, 64, dtype, k_scale, v_scale, "cuda",
                                                        v_keys_fastest=v_keys_fastest)
    dh = _hopper_decode_or_skip(q, k8, v8)
    out = torch.full_like(q, float("nan")).contiguous()
    dh.decode_attention(q, k8, v8, bt, sl, qsl, d**-0.5, out, k_scale=k_scale, v_scale=v_scale, stages=stages)
    ref = reference.paged_attention(q, k8, v8, bt, sl, qsl, d**-0.5, k_scale=k_scale, v_scale=v_scale)
    one = torch.cat([torch.full((ql,), ql == 1) for ql, _ in seqs]).cuda()
    what = f"hopper decode {dtype} hq={hq} hk={hk} d={d} stages={stages} {v_keys_fastest=}"
    assert_close(out[one], ref[one], dtype, what)
    assert out[~one].isnan().all(), f"{what}: wrote a prompt chunk's rows"
    exact = reference.paged_attention(q, k_hi, v_hi, bt, sl, qsl, d**-0.5)
    assert rel_err(out[one], exact[one]) <= FP8_VS_UNQUANTIZED


@gpu
@needs_cuda
@pytest.mark.parametrize("v_keys_fastest", [False, True], ids=["rowV", "keysV"])
def test_gpu_paged_attention_sends_full_fp8_decode_batches_to_the_hopper_kernel(monkeypatch, v_keys_fastest):
    """B=64 x 8 KV heads fills an H200 without split-KV: the Gluon kernel runs; 2 sequences would split: Triton."""
    from spool.kernels import decode_hopper

    calls = []
    real = decode_hopper.decode_attention
    monkeypatch.setattr(decode_hopper, "decode_attention", lambda *a, **kw: (calls.append(1), real(*a, **kw)))
    seqs = [(1, 4096 - 37 * (i % 5)) for i in range(64)]
    q, k8, v8 = make_fp8_batch(seqs[:1], 32, 8, 128, 64, torch.bfloat16, 0.02, 0.1, "cuda",
                               v_keys_fastest=v_keys_fastest)[:3]
    _hopper_decode_or_skip(q, k8, v8)
    check_fp8_attention(seqs, 32, 8, 128, 64, torch.bfloat16, device="cuda", v_keys_fastest=v_keys_fastest,
                        max_query_len=1)
    assert calls, "the decode batch did not run the Hopper kernel"
    calls.clear()
    check_fp8_attention(seqs[:2], 32, 8, 128, 64, torch.bfloat16, device="cuda", v_keys_fastest=v_keys_fastest,
                        max_query_len=1)
    assert not calls, "a 2-sequence batch (split-KV) ran the Hopper kernel"
    mixed = [(512, 3000), (1, 777)] + seqs[:40]  # decode rows beside a prompt chunk: never split
    check_fp8_attention(mixed, 32, 8, 128, 64, torch.bfloat16, device="cuda", v_keys_fastest=v_keys_fastest,
                        new_kv=True)
    assert calls, "a mixed step's decode rows did not run the Hopper kernel"
