"""Triton kernels vs spool.kernels.reference: odd small shapes on CPU (TRITON_INTERPRET=1), real shapes with -m gpu.

Error is ||out - ref|| / ||ref|| (float64). Bounds: fp32 1e-5 (the GPU computes fp32 dots as
tf32x3, ~1e-6); fp16 2e-3 (output rounding ~3e-4 plus P rounded to fp16 before P @ V); bf16 1e-2
(8-bit mantissa: output rounding alone is ~2e-3 on GPU, ~4e-3 under the interpreter, which
truncates instead of rounding to nearest). Every kernel output is poisoned: the `poison` fixture
makes torch.empty return NaN-filled tensors, so rows a kernel fails to write show up as NaN. KV
cache rows past each context (the tail of a partly filled last block, unused blocks, block 0 that
padded block-table entries point to) are NaN as well, so unmasked reads show up too.
"""
from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of kernels.*

import pytest  # noqa: E402

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import spool.kernels.paged_attention as _pa  # noqa: E402
from spool.kernels import reference  # noqa: E402
from spool.kernels.paged_attention import AttnConfig, choose_num_splits  # noqa: E402
from spool.kernels.triton_ops import TRITON_OPS as T  # noqa: E402
from spool.testing.jit_watch import jit_compiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not isinstance(_pa._paged_attn_kernel, InterpretedFunction):
    raise RuntimeError("kernels.* were imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    # dtype picks the bound: the coarsest rounding on the path (bf16 x with an fp32 weight: bf16)
    assert not out.isnan().any(), f"{what}: NaN in output (unwritten or masked-read rows)"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: rel err {err:.3e} > {TOL[dtype]:.0e}"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """torch.empty returns NaN-filled float tensors while a test runs (kernels allocate with it)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


# ---------------------------------------------------------------- paged attention


def make_batch(seqs, hq, hk, d, bs, dtype, device=DEVICE, seed=0):
    """seqs: [(query_len, context_len)]. Returns q (view into a fused qkv), caches, metadata."""
    torch.manual_seed(seed)
    nblocks = [math.ceil(c / bs) for _, c in seqs]
    num_blocks = sum(nblocks) + 3  # block 0 and two more stay unused (NaN)
    ids = (torch.randperm(num_blocks - 1) + 1)[: sum(nblocks)]
    bt = torch.zeros(len(seqs), max(nblocks) + 2, dtype=torch.int32)  # padded with 0, like the engine
    slots = []
    for s, (_, ctx) in enumerate(seqs):
        bt[s, : nblocks[s]] = ids[sum(nblocks[:s]) : sum(nblocks[: s + 1])]
        slots.append((bt[s, : nblocks[s]].long()[:, None] * bs + torch.arange(bs)).flatten()[:ctx])
    slots = torch.cat(slots).to(device)
    k_cache = torch.full((num_blocks, bs, hk, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache.view(-1, hk, d)[slots] = torch.randn(len(slots), hk, d, device=device).to(dtype)
    v_cache.view(-1, hk, d)[slots] = torch.randn(len(slots), hk, d, device=device).to(dtype)
    qlens = [ql for ql, _ in seqs]
    qkv = torch.randn(sum(qlens), hq + 2 * hk, d, device=device).to(dtype)
    q = qkv[:, :hq]  # [T, Hq, D], non-contiguous
    qsl = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    return q, k_cache, v_cache, bt.to(device), seq_lens.to(device), qsl.to(device)


def check_attention(seqs, hq, hk, d, bs, dtype, device=DEVICE, **kw):
    q, kc, vc, bt, sl, qsl = make_batch(seqs, hq, hk, d, bs, dtype, device)
    assert q.shape[0] <= 1 or not q.is_contiguous()  # a view into the fused qkv
    scale = d**-0.5
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, scale)
    out = T.paged_attention(q, kc, vc, bt, sl, qsl, scale, **kw)
    assert_close(out, ref, dtype, f"paged_attention {seqs} hq={hq} hk={hk} d={d} bs={bs} {dtype} {kw}")


DECODE = [(1, 1), (1, 17), (0, 9), (1, 150), (1, 64)]  # context 1, partial block, idle, several tiles, exact tiles
MIXED = [(1, 37), (20, 20), (13, 50), (0, 9), (1, 1), (45, 100)]  # decode, prefill, chunks over a prefix, idle
SMALL = AttnConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)  # many tiles on tiny shapes


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_decode(dtype, group, d, bs):
    check_attention(DECODE, 2 * group, 2, d, bs, dtype, max_query_len=1, max_seq_len=150)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_mixed(dtype, group, d):
    check_attention(MIXED, 2 * group, 2, d, 16 if d == 64 else 32, dtype)  # host computes max_query_len


@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("group", [1, 4])
def test_paged_attention_small_tiles_and_splits(seqs, splits, group):
    """Many KV tiles, several query tiles per sequence, causal diagonals, forced split-KV."""
    cfg = AttnConfig(block_m=32, block_n=16, num_warps=4, num_stages=2) if seqs is MIXED else SMALL
    check_attention(seqs, 2 * group, 2, 64, 16, torch.float32, num_splits=splits, config=cfg)


@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_32x32_tiles_in_every_dtype(seqs, dtype):
    """32x32 tiles, with and without forced splits, in every cache dtype (was the tuning-variants test)."""
    cfg = AttnConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    check_attention(seqs, 8, 2, 64, 16, dtype, config=cfg)
    check_attention(seqs, 8, 2, 64, 16, dtype, config=cfg, num_splits=3)


@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("bs,block_n", [(64, 64), (64, 32), (32, 16)])
def test_paged_attention_tiles_within_one_page(seqs, bs, block_n):
    """Pages at least a KV tile long: one page id per tile (no per-token gather), with and without splits."""
    cfg = AttnConfig(block_m=32, block_n=block_n, num_warps=4, num_stages=2)
    check_attention(seqs, 8, 2, 64, bs, torch.bfloat16, config=cfg)
    check_attention(seqs, 8, 2, 64, bs, torch.float32, config=cfg, num_splits=3)


def test_paged_attention_one_token_query_tiles():
    """Group 16 fills a 16-row tile: prefill tiles of one token each (the exact-search path)."""
    seqs, cfg = [(1, 37), (13, 50), (0, 9), (6, 6)], AttnConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)
    check_attention(seqs, 16, 1, 64, 16, torch.float16, config=cfg)
    check_attention(seqs, 16, 1, 64, 16, torch.float32, config=cfg, num_splits=2)


def test_paged_attention_auto_split():
    """Few programs and a long context: the heuristic splits (interpreter assumes 4 SMs)."""
    assert choose_num_splits(programs=2, max_seq_len=600, block_n=64, num_sms=4) > 1
    check_attention([(1, 600), (1, 5)], 4, 1, 64, 16, torch.float16)
    check_attention([(1, 600), (1, 5)], 4, 1, 64, 16, torch.float16, num_splits=1)
    check_attention([(3, 600), (1, 5)], 4, 1, 64, 16, torch.float32, num_splits=4)
    # CUDA graphs launch with max_seq_len = max_model_len: splits are sized per sequence on the device
    check_attention(DECODE, 4, 1, 64, 16, torch.float16, max_query_len=1, max_seq_len=1 << 17)


def new_kv_of(q, hk):
    """The fused qkv's k and v parts (views) for a make_batch q."""
    qkv = q._base if q._base is not None else q
    hq = q.shape[1]
    return qkv[:, hq:hq + hk], qkv[:, hq + hk:hq + 2 * hk]


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_new_kv_from_the_step(dtype, group, tma):
    """Prompt chunks read their own keys from k/v_new (contiguous), the prefix from the pages; decode rows too."""
    seqs = MIXED + [(70, 70), (33, 97)]  # several query tiles, a partial prefix page, a diagonal mid-tile
    q, kc, vc, bt, sl, qsl = make_batch(seqs, 2 * group, 2, 64, 16, dtype)
    kn, vn = new_kv_of(q, 2)
    scale = 64**-0.5
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, scale, k_new=kn, v_new=vn)
    for cfg in (AttnConfig(block_m=32, block_n=16, num_warps=4, num_stages=2, new_kv_tma=tma), None):
        out = T.paged_attention(q, kc, vc, bt, sl, qsl, scale, k_new=kn, v_new=vn, config=cfg)
        assert_close(out, ref, dtype, f"new kv {dtype} group={group} tma={tma} {cfg}")
    # k/v_new differ from the cache here, so reading them changed the result (they were not ignored)
    assert rel_err(ref, reference.paged_attention(q, kc, vc, bt, sl, qsl, scale)) > 0.05
    # as in the engine: k a contiguous tensor of its own (rotary or a q/k norm made it), v still a view of qkv
    out = T.paged_attention(q, kc, vc, bt, sl, qsl, scale, k_new=kn.contiguous(), v_new=vn,
                            config=AttnConfig(block_m=32, block_n=16, num_warps=4, num_stages=2, new_kv_tma=tma))
    assert_close(out, ref, dtype, f"new kv, k contiguous and v a view, {dtype} tma={tma}")


def test_paged_attention_new_kv_equals_the_cache_it_was_written_to():
    """With the new rows written to the cache (as the engine does), both reads give the same attention;
    pure decode steps read only the cache (k/v_new ignored)."""
    seqs = MIXED
    q, kc, vc, bt, sl, qsl = make_batch(seqs, 8, 2, 64, 16, torch.bfloat16)
    kn, vn = new_kv_of(q, 2)
    slots = torch.cat([(bt[s, : math.ceil(c / 16)].long()[:, None] * 16 + torch.arange(16)).flatten()[c - ql:c]
                       for s, (ql, c) in enumerate(seqs)])
    reference.write_kv_cache(kn, vn, kc, vc, slots)
    scale = 64**-0.5
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, scale)
    assert torch.equal(reference.paged_attention(q, kc, vc, bt, sl, qsl, scale, k_new=kn, v_new=vn), ref)
    assert_close(T.paged_attention(q, kc, vc, bt, sl, qsl, scale, k_new=kn, v_new=vn), ref, torch.bfloat16, "written")
    dq, dkc, dvc, dbt, dsl, dqsl = make_batch(DECODE, 8, 2, 64, 16, torch.float16)
    junk = torch.full((dq.shape[0], 2, 64), 1e4, dtype=torch.float16)
    assert torch.equal(T.paged_attention(dq, dkc, dvc, dbt, dsl, dqsl, scale, k_new=junk, v_new=junk),
                       T.paged_attention(dq, dkc, dvc, dbt, dsl, dqsl, scale))


def test_paged_attention_new_kv_bad_inputs():
    q, kc, vc, bt, sl, qsl = make_batch([(3, 5)], 4, 2, 64, 16, torch.float16)
    kn, vn = new_kv_of(q, 2)
    with pytest.raises(ValueError, match="k_new and v_new"):
        T.paged_attention(q, kc, vc, bt, sl, qsl, 0.1, k_new=kn.float(), v_new=vn)
    with pytest.raises(ValueError, match="k_new and v_new"):
        T.paged_attention(q, kc, vc, bt, sl, qsl, 0.1, k_new=kn, v_new=None)


def test_paged_attention_bad_inputs():
    q, kc, vc, bt, sl, qsl = make_batch([(1, 5)], 4, 2, 64, 16, torch.float16)
    with pytest.raises(TypeError, match="dtypes"):
        T.paged_attention(q.float(), kc, vc, bt, sl, qsl, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        T.paged_attention(q[:, :3], kc, vc, bt, sl, qsl, 0.1)
    with pytest.raises(ValueError, match="number of sequences"):
        T.paged_attention(q, kc, vc, bt, sl, qsl[:1], 0.1)
    with pytest.raises(ValueError, match="powers of 2"):
        T.paged_attention(q[..., :48], kc[..., :48], vc[..., :48], bt, sl, qsl, 0.1)


# ---------------------------------------------------------------- small kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 64), (1, 33)])
def test_rms_norm(shape, dtype):
    x = torch.randn(shape).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype).to(DEVICE)
    assert_close(T.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), dtype, "rms_norm")


def test_rms_norm_fp32_weight_bf16_input():
    x = torch.randn(5, 80).to(torch.bfloat16).to(DEVICE)
    w = torch.randn(80, device=DEVICE)
    assert_close(T.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), torch.bfloat16, "rms_norm promote")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm(dtype, inplace):
    x = torch.randn(9, 160).to(dtype).to(DEVICE)
    r = torch.randn(9, 160).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(160)).to(dtype).to(DEVICE)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    out, res = T.fused_add_rms_norm(x, r, w, 1e-6, inplace=inplace)
    if inplace:
        assert out.data_ptr() == x.data_ptr() and res.data_ptr() == r.data_ptr()
    assert_close(res, ref_res, dtype, "residual")
    assert_close(out, ref_out, dtype, "normed")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 2 * 96), (2, 3, 2 * 64)])
def test_silu_and_mul(shape, dtype):
    x = torch.randn(shape).to(dtype).to(DEVICE)
    assert_close(T.silu_and_mul(x), reference.silu_and_mul(x), dtype, "silu_and_mul")
    xs = torch.randn(shape[0], 3 * shape[-1]).to(dtype).to(DEVICE)[:, : shape[-1]]  # strided rows
    assert_close(T.silu_and_mul(xs), reference.silu_and_mul(xs), dtype, "silu_and_mul strided")


def inv_freq(d: int, base: float, llama3: bool = False) -> torch.Tensor:
    """[d/2] float64; llama3 scaling: factor 8, low/high freq factors 1/4, original max positions 8192."""
    freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if llama3:
        factor, low, high, orig = 8.0, 1.0, 4.0, 8192
        wavelen = 2 * math.pi / freq
        smooth = (orig / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > orig / low, freq / factor, freq)
        medium = (wavelen >= orig / high) & (wavelen <= orig / low)
        freq = torch.where(medium, (1 - smooth) * freq / factor + smooth * freq, scaled)
    return freq


def rope_cache(d: int, max_pos: int, base: float = 10000.0, llama3: bool = False) -> torch.Tensor:
    """[max_pos, d] float32 cos | sin, angles computed in float64."""
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq(d, base, llama3))
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


def test_llama3_inv_freq_matches_transformers():
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    try:  # transformers >= 5 (rope_parameters)
        cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=params)
        want, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    except (KeyError, TypeError, AttributeError) as e:
        pytest.skip(f"this transformers version builds llama3 rope differently: {e!r}")
    torch.testing.assert_close(inv_freq(128, 500000.0, llama3=True).float(), want.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("llama3", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,hq,hk", [(64, 4, 4), (128, 8, 2), (128, 3, 1)])
def test_rotary(d, hq, hk, dtype, llama3, inplace):
    t, max_pos = 11, 16384
    cache = rope_cache(d, max_pos, base=500000.0, llama3=llama3).to(DEVICE)
    pos = torch.randint(0, max_pos, (t,)).to(DEVICE)
    pos[0] = max_pos - 1
    qkv = torch.randn(t, hq + 2 * hk, d).to(dtype).to(DEVICE)
    q, k = qkv[:, :hq], qkv[:, hq : hq + hk]  # views into a fused qkv
    ref_q, ref_k = reference.rotary_embedding(pos, q, k, cache)
    out_q, out_k = T.rotary_embedding(pos, q, k, cache, inplace=inplace)
    if inplace:
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert_close(out_q, ref_q, dtype, "rotary q")
    assert_close(out_k, ref_k, dtype, "rotary k")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,hq,hk", [(64, 4, 4), (128, 16, 8), (128, 3, 1), (32, 5, 2)])
def test_qk_norm_rotary(d, hq, hk, dtype):
    """Qwen3's q/k norm + rotary on views into a fused qkv equals rms_norm then rotary_embedding."""
    t, max_pos = 13, 4096
    cache = rope_cache(d, max_pos, base=1000000.0).to(DEVICE)
    pos = torch.randint(0, max_pos, (t,)).to(DEVICE)
    qkv = (3 * torch.randn(t, hq + 2 * hk, d)).to(dtype).to(DEVICE)
    q, k = qkv[:, :hq], qkv[:, hq : hq + hk]
    qw = (1 + 0.1 * torch.randn(d)).to(dtype).to(DEVICE)
    kw = (1 + 0.1 * torch.randn(d)).to(dtype).to(DEVICE)
    ref_q, ref_k = reference.qk_norm_rotary(pos, q, k, qw, kw, 1e-6, cache)
    out_q, out_k = T.qk_norm_rotary(pos, q, k, qw, kw, 1e-6, cache)
    assert out_q.shape == (t, hq, d) and out_k.shape == (t, hk, d) and out_q.is_contiguous()
    assert out_q.dtype == out_k.dtype == dtype
    # bf16 rounds three times on the way (normed row, weight product, rotation); the interpreter truncates each
    # (~9e-3 here, the same as rms_norm then rotary_embedding through the Triton ops), the GPU rounds to nearest.
    tol = 2e-2 if dtype == torch.bfloat16 and DEVICE == "cpu" else TOL[dtype]
    assert rel_err(out_q, ref_q) <= tol and rel_err(out_k, ref_k) <= tol, (rel_err(out_q, ref_q), rel_err(out_k, ref_k))
    assert not (out_q.isnan().any() or out_k.isnan().any())
    # The reference is the two ops it fuses.
    want_q, want_k = reference.rotary_embedding(pos, reference.rms_norm(q, qw, 1e-6), reference.rms_norm(k, kw, 1e-6),
                                                cache)
    assert torch.equal(ref_q, want_q) and torch.equal(ref_k, want_k)


def test_qk_norm_rotary_promotes_to_the_weights_dtype_and_takes_no_tokens():
    cache = rope_cache(64, 128).to(DEVICE)
    q = torch.randn(4, 2, 64).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(4, 1, 64).to(torch.bfloat16).to(DEVICE)
    w = torch.randn(64, device=DEVICE)  # float32 weights: the norm's output is float32, as in the reference
    pos = torch.arange(4, device=DEVICE)
    ref_q, ref_k = reference.qk_norm_rotary(pos, q, k, w, w, 1e-5, cache)
    out_q, out_k = T.qk_norm_rotary(pos, q, k, w, w, 1e-5, cache)
    assert out_q.dtype == ref_q.dtype == torch.float32
    assert_close(out_q, ref_q, torch.bfloat16, "promoted q")
    assert_close(out_k, ref_k, torch.bfloat16, "promoted k")
    eq, ek = T.qk_norm_rotary(pos[:0], q[:0], k[:0], w, w, 1e-5, cache)
    assert eq.shape == (0, 2, 64) and ek.shape == (0, 1, 64)
    with pytest.raises(ValueError, match="weights must both be"):
        T.qk_norm_rotary(pos, q, k, w[:32], w, 1e-5, cache)


def test_rotary_ops_name_themselves_in_one_line_errors():
    cache = rope_cache(64, 32).to(DEVICE)
    q, k = torch.randn(3, 2, 64, device=DEVICE), torch.randn(3, 1, 64, device=DEVICE)
    pos, w = torch.arange(3, device=DEVICE), torch.ones(64, device=DEVICE)
    cases = [
        (dict(q=q[:, :, :32]), ValueError, "want q \\[T, Hq, D\\], k \\[T, Hk, D\\]"),
        (dict(cache=cache.double()), TypeError, "cos_sin_cache must be float32"),
        (dict(cache=cache[:, :32]), ValueError, "cos_sin_cache must be \\[max_pos, 64\\]"),
        (dict(pos=pos.float()), ValueError, "positions must be int \\[3\\]"),
        (dict(k=k.double()), TypeError, "q and k must share a float dtype"),
    ]
    for change, err, msg in cases:
        a = dict(pos=pos, q=q, k=k, cache=cache) | change
        with pytest.raises(err, match=f"^rotary_embedding: {msg}"):
            T.rotary_embedding(a["pos"], a["q"], a["k"], a["cache"])
        with pytest.raises(err, match=f"^qk_norm_rotary: {msg}"):
            T.qk_norm_rotary(a["pos"], a["q"], a["k"], w, w, 1e-6, a["cache"])
    with pytest.raises(TypeError, match="^qk_norm_rotary: q, k and the weights must be float32/float16/bfloat16"):
        T.qk_norm_rotary(pos, q.double(), k.double(), w.double(), w.double(), 1e-6, cache)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hk,d,bs", [(1, 64, 16), (2, 128, 32), (8, 128, 16), (3, 64, 32)])
def test_write_kv_cache(hk, d, bs, dtype):
    t, num_blocks = 9, 6
    kv = torch.randn(t, 2 * hk + 1, d).to(dtype).to(DEVICE)
    k, v = kv[:, :hk], kv[:, hk : 2 * hk]  # strided views
    slots = torch.randperm(num_blocks * bs)[:t]
    slots[[2, 5]] = -1  # padding tokens
    slots = slots.to(DEVICE)
    kc = torch.full((num_blocks, bs, hk, d), float("nan"), dtype=dtype, device=DEVICE)
    vc = torch.full_like(kc, float("nan"))
    ref_kc, ref_vc = kc.clone(), vc.clone()
    reference.write_kv_cache(k, v, ref_kc, ref_vc, slots)
    T.write_kv_cache(k, v, kc, vc, slots)
    torch.testing.assert_close(kc, ref_kc, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, ref_vc, rtol=0, atol=0, equal_nan=True)


def test_write_kv_cache_casts_to_cache_dtype():
    k = torch.randn(4, 2, 64, device=DEVICE)
    v = torch.randn(4, 2, 64, device=DEVICE)
    slots = torch.tensor([3, 0, 17, 30], device=DEVICE)
    kc = torch.zeros(2, 16, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    vc = torch.zeros_like(kc)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    reference.write_kv_cache(k, v, ref_kc, ref_vc, slots)
    T.write_kv_cache(k, v, kc, vc, slots)
    assert rel_err(kc, ref_kc) < TOL[torch.bfloat16] and rel_err(vc, ref_vc) < TOL[torch.bfloat16]


def test_ops_backend():
    from spool.kernels.ops import get_ops

    assert get_ops("triton", DEVICE) is T and T.name == "triton"


# ---------------------------------------------------------------- real shapes (GPU tier)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_decode_batch64_ctx4096(dtype):
    seqs = [(1, 4096 - 37 * (i % 5)) for i in range(64)]  # ragged ends: partial last blocks
    check_attention(seqs, 32, 8, 128, 16, dtype, device="cuda", max_query_len=1, max_seq_len=4096)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch,ctx", [(1, 32768), (4, 8192), (16, 1000)])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_decode_split_kv(batch, ctx, group):
    check_attention([(1, ctx)] * batch, 8 * group, 8, 128, 16, torch.bfloat16, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("d,bs", [(128, 16), (64, 32)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_prefill_2048(dtype, d, bs):
    check_attention([(2048, 2048)], 32, 8, d, bs, dtype, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_prefill_new_kv(dtype, tma):
    seqs = [(2048, 2048), (512, 3000), (1, 777), (700, 700), (17, 4113)]
    q, kc, vc, bt, sl, qsl = make_batch(seqs, 32, 8, 128, 16, dtype, "cuda")
    kn, vn = new_kv_of(q, 8)
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn)
    cfg = _pa.default_config(False, 128, 4, dtype)
    cfg = AttnConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, new_kv_tma=tma)
    out = T.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, config=cfg)
    assert_close(out, ref, dtype, f"gpu new kv {dtype} tma={tma}")


@gpu
@needs_cuda
@pytest.mark.parametrize("one_query", [True, False], ids=["decode", "prompt"])
def test_gpu_block_table_width_never_recompiles(one_query):
    """A step's block table is as wide as its longest sequence, so its row stride changes from step to step;
    new widths (1, multiples of 16, others) reuse the compiled kernel instead of compiling mid-run."""
    compiled_per_call = []
    for ctxs in ([100, 37], [16, 9], [256, 250], [512, 3], [1000, 77]):  # table widths 7, 1, 16, 32, 63
        seqs = [(1 if one_query else min(c, 40), c) for c in ctxs]
        q, kc, vc, bt, sl, qsl = make_batch(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda")
        bt = bt[:, :-2].contiguous()  # make_batch pads two columns; the engine's tables fit the longest exactly
        kn, vn = (None, None) if one_query else new_kv_of(q, 8)
        ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn)
        with jit_compiles() as compiled:
            out = T.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, num_splits=1)
            torch.cuda.synchronize()
        assert_close(out, ref, torch.bfloat16, f"width {bt.shape[1]}")
        compiled_per_call.append(compiled)
    assert not any(compiled_per_call[1:]), f"recompiled for a new block table width: {compiled_per_call}"


@gpu
@needs_cuda
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_mixed_chunked_prefill(group):
    seqs = [(512, 3000), (2048, 2048), (1, 777)] + [(1, 4096)] * 30 + [(17, 4113), (0, 5)]
    check_attention(seqs, 8 * group, 8, 128, 16, torch.bfloat16, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_small_kernels_real_shapes(dtype):
    t, hidden, inter, hq, hk, d = 2048, 4096, 14336, 32, 8, 128
    x = torch.randn(t, hidden, device="cuda").to(dtype)
    r = torch.randn(t, hidden, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    assert_close(T.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), dtype, "rms_norm")
    for got, want in zip(T.fused_add_rms_norm(x, r, w, 1e-5), reference.fused_add_rms_norm(x, r, w, 1e-5)):
        assert_close(got, want, dtype, "fused_add_rms_norm")
    g = torch.randn(t, 2 * inter, device="cuda").to(dtype)
    assert_close(T.silu_and_mul(g), reference.silu_and_mul(g), dtype, "silu_and_mul")
    cache = rope_cache(d, 131072, base=500000.0, llama3=True).cuda()
    pos = torch.randint(0, 131072, (t,), device="cuda")
    qkv = torch.randn(t, hq + 2 * hk, d, device="cuda").to(dtype)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    for got, want in zip(T.rotary_embedding(pos, q, k, cache), reference.rotary_embedding(pos, q, k, cache)):
        assert_close(got, want, dtype, "rotary")
    qw = (1 + 0.1 * torch.randn(d, device="cuda")).to(dtype)
    kw = (1 + 0.1 * torch.randn(d, device="cuda")).to(dtype)
    for got, want in zip(T.qk_norm_rotary(pos, q, k, qw, kw, 1e-6, cache),
                         reference.qk_norm_rotary(pos, q, k, qw, kw, 1e-6, cache)):
        assert_close(got, want, dtype, "qk_norm_rotary")
    kc = torch.zeros(400, 16, hk, d, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    slots = torch.randperm(400 * 16, device="cuda")[:t]
    reference.write_kv_cache(k, v, ref_kc, ref_vc, slots)
    T.write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)
