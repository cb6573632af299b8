"""spool.kernels.prefill_hopper: which calls it takes (CPU), and the Gluon kernel against the reference (-m gpu).

The kernel is never interpreted (Gluon has no CPU interpreter), so the CPU tests cover the dispatch predicate and
the GPU tier covers the numbers: prompt chunks with and without a cached prefix, caches whose rows past each context
are NaN (make_batch), several tile and ring depths, the llama3-8b and qwen3 head groups, and the whole
paged_attention call (prompt chunks here, decode rows beside them on the Triton kernel).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from spool.kernels import prefill_hopper, reference  # noqa: E402
from spool.kernels.kv_layout import allocate_kv_cache  # noqa: E402
from tests.test_kernels import assert_close, make_batch, new_kv_of, poison  # noqa: E402,F401

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and prefill_hopper.available()
hopper = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU and Gluon")


def _inputs(dtype=torch.bfloat16, d=128, bs=16, hq=32, hk=8, t=64):
    qkv = torch.zeros(t, hq + 2 * hk, d, dtype=dtype)
    kc, vc = allocate_kv_cache(40, bs, hk, d, dtype, "cpu")
    return qkv[:, :hq], kc, vc, qkv[:, hq:hq + hk], qkv[:, hq + hk:]


def test_layout_ok_takes_the_engines_prompt_steps():
    """The engine's layouts: q, k and v views of one fused qkv, zeroed paged caches; bf16 and fp16, d 64 and 128."""
    for dtype in (torch.bfloat16, torch.float16):
        for d, bs in ((128, 16), (64, 64), (128, 8)):
            assert prefill_hopper.layout_ok(*_inputs(dtype, d, bs)), (dtype, d, bs)
    q, kc, vc, kn, vn = _inputs()
    assert prefill_hopper.layout_ok(q, kc, vc, kn.contiguous(), vn)  # k made by a rotary/norm kernel
    assert prefill_hopper.layout_ok(q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), kn, vn)  # fp8 KV


@pytest.mark.parametrize("what", ["fp32", "fp8 e5m2 cache", "d96", "page 4", "v keys-fastest", "strided cache",
                                  "k_new head stride"])
def test_layout_ok_leaves_the_rest_to_the_triton_kernel(what):
    q, kc, vc, kn, vn = _inputs()
    if what == "fp32":
        q, kc, vc, kn, vn = _inputs(torch.float32)
    elif what == "fp8 e5m2 cache":
        kc, vc = kc.to(torch.float8_e5m2), vc.to(torch.float8_e5m2)
    elif what == "d96":
        q, kc, vc, kn, vn = _inputs(d=96)
    elif what == "page 4":
        q, kc, vc, kn, vn = _inputs(bs=4)
    elif what == "v keys-fastest":
        vc = torch.zeros(40, 8, 128, 64, dtype=torch.bfloat16).permute(0, 3, 1, 2)  # [blocks, 64, Hk, D] view
    elif what == "strided cache":  # every other block of a larger cache: not one dense [blocks * page, Hk * D]
        kc = torch.zeros(80, 16, 8, 128, dtype=torch.bfloat16)[::2]
    elif what == "k_new head stride":
        kn = torch.zeros(64, 128, 8, dtype=torch.bfloat16).transpose(1, 2)
    assert not prefill_hopper.layout_ok(q, kc, vc, kn, vn)


def test_default_tiles_come_from_the_environment_with_a_clear_error():
    assert prefill_hopper._default_tiles("64,4,0") == (64, 4, 0)
    for bad in ("64,3", "64,3,1,0", "x,3,1", "96,3,1", "64,9,1", "64,3,2"):
        with pytest.raises(ValueError, match="SPOOL_GLUON_PREFILL=.*want 'block_n,stages,persistent'"):
            prefill_hopper._default_tiles(bad)


def test_cpu_tensors_never_take_the_hopper_kernel():
    assert not prefill_hopper.supported(*_inputs())


# ---------------------------------------------------------------- the kernel, on Hopper

PROMPTS = [(2048, 2048)]  # one fresh prompt: 16 query tiles of 32 tokens
CHUNKS = [(512, 3000), (700, 700), (1, 777), (17, 4113), (2, 2), (130, 130), (5, 1029), (0, 9), (300, 1300)]
CONFIGS = [(bn, st, pers) for bn, st in prefill_hopper.CONFIGS for pers in (True, False)]


FP8_SCALES = {"k_scale": 0.5, "v_scale": 2.0}


def _fp8_caches(kc, vc):
    """make_batch's caches stored in fp8 as the engine's are: x / scale, never NaN (spool.kernels.kv_layout)."""
    return ((kc.nan_to_num() / FP8_SCALES["k_scale"]).to(torch.float8_e4m3fn),
            (vc.nan_to_num() / FP8_SCALES["v_scale"]).to(torch.float8_e4m3fn))


def _prompt_rows(seqs):
    """Which of a batch's token rows belong to prompt chunks (sequences with more than one query)."""
    return torch.cat([torch.full((ql,), ql > 1, dtype=torch.bool) for ql, _ in seqs]).cuda()


def _check(seqs, hq, hk, d, bs, dtype, block_n, stages, persistent, fp8=False):
    q, kc, vc, bt, sl, qsl = make_batch(seqs, hq, hk, d, bs, dtype, "cuda")
    kn, vn = new_kv_of(q, hk)
    scales = FP8_SCALES if fp8 else {}
    if fp8:
        kc, vc = _fp8_caches(kc, vc)
    assert prefill_hopper.supported(q, kc, vc, kn, vn)
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, d**-0.5, k_new=kn, v_new=vn, **scales)
    out = torch.zeros_like(ref)
    prefill_hopper.prefill_attention(q, kc, vc, bt, sl, qsl, kn, vn, d**-0.5, out, block_n=block_n, stages=stages,
                                     persistent=persistent, **scales)
    prompt = _prompt_rows(seqs)
    what = f"{seqs[:3]}... hq={hq} hk={hk} d={d} bs={bs} {dtype} fp8={fp8} bn={block_n} st={stages} pers={persistent}"
    assert_close(out[prompt], ref[prompt], dtype, what)
    assert not out[~prompt].any(), f"{what}: wrote a decode row"


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("block_n,stages,persistent", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_fresh_prompt_2048(dtype, block_n, stages, persistent):
    _check(PROMPTS, 32, 8, 128, 16, dtype, block_n, stages, persistent)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("block_n,stages,persistent", CONFIGS)
@pytest.mark.parametrize("hq,hk,d,bs", [(32, 8, 128, 16), (32, 8, 128, 64), (16, 8, 128, 16), (8, 2, 64, 32),
                                        (24, 8, 128, 16), (8, 8, 64, 8)])
def test_gpu_chunks_over_cached_prefixes(hq, hk, d, bs, block_n, stages, persistent):
    """Chunks after a prefix (partial last prefix tiles, pages past the context NaN), decode rows left alone,
    several sequences of odd lengths; head groups of 4 (llama3), 2 (qwen3), 3 (rows padded) and 1."""
    _check(CHUNKS, hq, hk, d, bs, torch.bfloat16, block_n, stages, persistent)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("block_n,stages,persistent", CONFIGS)
@pytest.mark.parametrize("bs", [16, 64])
def test_gpu_fp8_cache(bs, block_n, stages, persistent):
    """An fp8 KV cache (scales 0.5 and 2): prefix tiles widened in shared memory, the chunks' own keys unquantized."""
    _check(PROMPTS + CHUNKS, 32, 8, 128, bs, torch.bfloat16, block_n, stages, persistent, fp8=True)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16 KV", "fp8 KV"])
@pytest.mark.parametrize("seqs", [PROMPTS + CHUNKS, [(1, 50)] * 20 + [(64, 64)] * 3], ids=["mixed", "mostly decode"])
def test_gpu_paged_attention_dispatches_prompt_chunks_to_it(seqs, fp8):
    """paged_attention's default for prompt steps on Hopper: prompt chunks here, decode rows on the Triton kernel."""
    from spool.kernels.triton_ops import TRITON_OPS as T

    q, kc, vc, bt, sl, qsl = make_batch(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda")
    kn, vn = new_kv_of(q, 8)
    scales = FP8_SCALES if fp8 else {}
    if fp8:
        kc, vc = _fp8_caches(kc, vc)
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, **scales)
    out = T.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, **scales)
    assert_close(out, ref, torch.bfloat16, f"paged_attention {seqs[:3]} fp8={fp8}")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("block_n,stages,persistent", CONFIGS)
def test_gpu_launches_agree_bitwise(block_n, stages, persistent):
    """The kernel is deterministic: ten launches (the first on cold caches, right after compiling) give the same
    bits. A race between the producer warp and the consumers (a stage refilled early, a tile read before it landed)
    would show as launches that disagree."""
    seqs = PROMPTS + CHUNKS
    q, kc, vc, bt, sl, qsl = make_batch(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=7)
    kn, vn = new_kv_of(q, 8)
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn)
    prompt = _prompt_rows(seqs)
    outs = []
    for _ in range(10):
        torch.cuda.empty_cache()
        out = torch.zeros_like(ref)
        prefill_hopper.prefill_attention(q, kc, vc, bt, sl, qsl, kn, vn, 128**-0.5, out, block_n=block_n,
                                         stages=stages, persistent=persistent)
        outs.append(out[prompt])
    assert_close(outs[0], ref[prompt], torch.bfloat16, "first launch")
    bad = [i for i, o in enumerate(outs) if not torch.equal(o, outs[0])]
    assert not bad, f"launches {bad} differ from the first (bn={block_n} st={stages} persistent={persistent})"
