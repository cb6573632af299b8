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
from tests.test_fp8_kv import FP8_VS_UNQUANTIZED, make_fp8_batch, new_rows  # noqa: E402
from tests.test_kernels import assert_close, make_batch, new_kv_of, poison, rel_err  # noqa: E402,F401

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
    assert prefill_hopper._default_tiles("64,4,0") == (64, 4, 0, "both")  # fp8 tiles widened by both consumers
    assert prefill_hopper._default_tiles("64,3,1,warps") == (64, 3, 1, "warps")
    for bad in ("64,3", "64,3,1,0", "64,3,1,split,1", "x,3,1", "96,3,1", "64,9,1", "64,3,2"):
        with pytest.raises(ValueError, match=r"SPOOL_GLUON_PREFILL=.*want 'block_n,stages,persistent\[,widen\]'"):
            prefill_hopper._default_tiles(bad)


def test_an_unknown_widen_is_refused_before_any_launch():
    q, kc, vc, kn, vn = _inputs()
    meta = torch.zeros(1, 4, dtype=torch.int32), torch.tensor([64], dtype=torch.int32), torch.tensor([0, 64])
    with pytest.raises(ValueError, match="widen='sideways': want one of both, split, warps"):
        prefill_hopper.prefill_attention(q, kc, vc, *meta, kn, vn, 0.1, torch.empty_like(q), widen="sideways")


def test_the_kernel_runs_only_on_the_triton_releases_it_is_written_for(monkeypatch, caplog):
    """Gluon's API changes between releases (3.9 renamed or dropped calls the kernel makes): on any other release
    prompt chunks stay on the Triton kernel, and a Hopper machine says so once."""
    if prefill_hopper.gluon is None:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.setattr(prefill_hopper, "triton_release", lambda: "3.6")
    assert prefill_hopper.available()
    monkeypatch.setattr(prefill_hopper, "triton_release", lambda: "3.9")
    assert not prefill_hopper.available()
    prefill_hopper._available_said.cache_clear()
    try:
        with caplog.at_level("INFO", logger="spool.kernels.prefill_hopper"):
            assert not prefill_hopper._available_said() and not prefill_hopper._available_said()
    finally:
        prefill_hopper._available_said.cache_clear()
    said = [r.getMessage() for r in caplog.records if r.name == "spool.kernels.prefill_hopper"]
    assert said == ["prompt attention runs on the Triton kernel, not the Gluon one for Hopper: it is written for "
                    "Triton 3.6, and this is Triton 3.9"], said


def test_cpu_tensors_never_take_the_hopper_kernel():
    assert not prefill_hopper.supported(*_inputs())


# ---------------------------------------------------------------- the kernel, on Hopper

PROMPTS = [(2048, 2048)]  # one fresh prompt: 16 query tiles of 32 tokens
CHUNKS = [(512, 3000), (700, 700), (1, 777), (17, 4113), (2, 2), (130, 130), (5, 1029), (0, 9), (300, 1300)]
CONFIGS = [(bn, st, pers) for bn, st in prefill_hopper.CONFIGS for pers in (True, False)]
FP8_K_SCALE, FP8_V_SCALE = 0.02, 0.1  # tests/test_fp8_kv.py's


def _fp8_batch(seqs, bs, seed=0):
    """tests/test_fp8_kv.py's fp8 batch (llama3-8b heads): K/V near the scales' useful range, dead K rows NaN codes
    and dead V rows 448 (a dead row reaching P @ V shows), the chunks' own K/V unquantized as the engine passes them.
    Returns q, the fp8 caches, metadata, k/v_new, the scales, and the unquantized caches."""
    q, k8, v8, bt, sl, qsl, k_hi, v_hi = make_fp8_batch(seqs, 32, 8, 128, bs, torch.bfloat16, FP8_K_SCALE,
                                                        FP8_V_SCALE, "cuda", seed=seed)
    kn, vn = new_rows(k_hi, bt, seqs, bs), new_rows(v_hi, bt, seqs, bs)
    return q, k8, v8, bt, sl, qsl, kn, vn, {"k_scale": FP8_K_SCALE, "v_scale": FP8_V_SCALE}, k_hi, v_hi


def _llama3_batch(seqs, fp8, seed=0):
    """A batch at llama3-8b's heads (32/8, d128, pages of 16): make_batch's with bf16 KV, else _fp8_batch's.
    Returns q, the caches, metadata, k/v_new and the scales paged_attention takes (none for bf16)."""
    if fp8:
        return _fp8_batch(seqs, 16, seed)[:9]
    q, kc, vc, bt, sl, qsl = make_batch(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=seed)
    return (q, kc, vc, bt, sl, qsl, *new_kv_of(q, 8), {})


def _prompt_rows(seqs):
    """Which of a batch's token rows belong to prompt chunks (sequences with more than one query)."""
    return torch.cat([torch.full((ql,), ql > 1, dtype=torch.bool) for ql, _ in seqs]).cuda()


def _check(seqs, hq, hk, d, bs, dtype, block_n, stages, persistent):
    q, kc, vc, bt, sl, qsl = make_batch(seqs, hq, hk, d, bs, dtype, "cuda")
    kn, vn = new_kv_of(q, hk)
    assert prefill_hopper.supported(q, kc, vc, kn, vn)
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, d**-0.5, k_new=kn, v_new=vn)
    out = torch.zeros_like(ref)
    prefill_hopper.prefill_attention(q, kc, vc, bt, sl, qsl, kn, vn, d**-0.5, out, block_n=block_n, stages=stages,
                                     persistent=persistent)
    prompt = _prompt_rows(seqs)
    what = f"{seqs[:3]}... hq={hq} hk={hk} d={d} bs={bs} {dtype} bn={block_n} st={stages} pers={persistent}"
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
@pytest.mark.parametrize("widen", prefill_hopper.WIDEN_MODES)
@pytest.mark.parametrize("block_n,stages,persistent", CONFIGS)
@pytest.mark.parametrize("bs", [16, 64])
def test_gpu_fp8_cache(bs, block_n, stages, persistent, widen):
    """An fp8 KV cache: prefix tiles widened in shared memory (each way: see prefill_hopper._tile_ready), dead
    rows past each context hold NaN K codes and the largest V code, the chunks' own keys unquantized. Against the
    reference on the same fp8 cache, and within fp8's error of the unquantized cache."""
    seqs = PROMPTS + CHUNKS
    q, k8, v8, bt, sl, qsl, kn, vn, scales, k_hi, v_hi = _fp8_batch(seqs, bs)
    assert prefill_hopper.supported(q, k8, v8, kn, vn)
    ref = reference.paged_attention(q, k8, v8, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, **scales)
    out = torch.zeros_like(ref)
    prefill_hopper.prefill_attention(q, k8, v8, bt, sl, qsl, kn, vn, 128**-0.5, out, block_n=block_n, stages=stages,
                                     persistent=persistent, widen=widen, **scales)
    prompt = _prompt_rows(seqs)
    what = f"fp8 bs={bs} bn={block_n} st={stages} pers={persistent} widen={widen}"
    assert_close(out[prompt], ref[prompt], torch.bfloat16, what)
    assert not out[~prompt].any(), f"{what}: wrote a decode row"
    exact = reference.paged_attention(q, k_hi, v_hi, bt, sl, qsl, 128**-0.5)[prompt]
    assert rel_err(out[prompt], exact) <= FP8_VS_UNQUANTIZED, what


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16 KV", "fp8 KV"])
@pytest.mark.parametrize("seqs", [PROMPTS + CHUNKS, [(1, 50)] * 20 + [(64, 64)] * 3], ids=["mixed", "mostly decode"])
def test_gpu_paged_attention_dispatches_prompt_chunks_to_it(seqs, fp8):
    """paged_attention's default for prompt steps on Hopper: prompt chunks here, decode rows on the Triton kernel."""
    from spool.kernels.triton_ops import TRITON_OPS as T

    q, kc, vc, bt, sl, qsl, kn, vn, scales = _llama3_batch(seqs, fp8)
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, **scales)
    out = T.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, **scales)
    assert_close(out, ref, torch.bfloat16, f"paged_attention {seqs[:3]} fp8={fp8}")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("kv", ["bf16"] + [f"fp8 {w}" for w in prefill_hopper.WIDEN_MODES])
@pytest.mark.parametrize("block_n,stages,persistent", CONFIGS)
def test_gpu_launches_agree_bitwise(block_n, stages, persistent, kv):
    """The kernel is deterministic: ten launches (the first on cold caches, right after compiling) give the same
    bits. A race between the producer warp and the consumers (a stage refilled early, a tile read before it landed),
    or over an fp8 tile's widening (read before the other consumer or the converter warpgroup widened it, or
    overwritten while still read), would show as launches that disagree."""
    seqs = PROMPTS + CHUNKS
    widen = "both" if kv == "bf16" else kv.split()[1]  # "fp8 warps" -> "warps"
    q, kc, vc, bt, sl, qsl, kn, vn, scales = _llama3_batch(seqs, kv != "bf16", seed=7)
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, **scales)
    prompt = _prompt_rows(seqs)
    outs = []
    for _ in range(10):
        torch.cuda.empty_cache()
        out = torch.zeros_like(ref)
        prefill_hopper.prefill_attention(q, kc, vc, bt, sl, qsl, kn, vn, 128**-0.5, out, block_n=block_n,
                                         stages=stages, persistent=persistent, widen=widen, **scales)
        outs.append(out[prompt])
    what = f"{kv} bn={block_n} st={stages} persistent={persistent}"
    assert_close(outs[0], ref[prompt], torch.bfloat16, f"first launch, {what}")
    bad = [i for i, o in enumerate(outs) if not torch.equal(o, outs[0])]
    assert not bad, f"launches {bad} differ from the first ({what})"
