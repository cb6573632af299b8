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
    assert prefill_hopper._default_tiles("64,4,0") == (64, 4, 0)
    assert prefill_hopper._default_tiles("128,2,1") == (128, 2, 1)
    for bad in ("64,3", "64,3,1,warps", "x,3,1", "96,3,1", "64,9,1", "64,3,2"):
        with pytest.raises(ValueError, match=r"SPOOL_GLUON_PREFILL=.*want 'block_n,stages,persistent'"):
            prefill_hopper._default_tiles(bad)


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


def _run_e4m3_ptx(word: int) -> list[int]:
    """prefill_hopper.E4M3_TO_BF16_PTX run on one register of 4 fp8 codes, by a model of its few instructions
    (prmt's default mode: a selector nibble picks a byte of {b, a}, its bit 3 replicates that byte's sign;
    mul.rn.bf16x2 as bf16 products, exact here). Returns the four bf16 bit patterns, element 0 first."""
    regs = {"$2": word}

    def val(x):
        return regs[x] if x in regs else int(x, 0)

    def bf16_mul(a, b):  # two 16-bit lanes each
        out = 0
        for lane in (0, 16):
            x, y = (torch.tensor([(v >> lane) & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
                    for v in (a, b))
            out |= (int((x * y).view(torch.int16).item()) & 0xFFFF) << lane
        return out

    for line in prefill_hopper.E4M3_TO_BF16_PTX.splitlines():
        op, _, rest = line.strip().rstrip(";").partition(" ")
        args = [a.strip() for a in rest.split(",")]
        if op == "prmt.b32":
            src = [(val(args[1]) >> (8 * i)) & 0xFF for i in range(4)] + [(val(args[2]) >> (8 * i)) & 0xFF
                                                                          for i in range(4)]
            out = 0
            for i in range(4):
                n = (val(args[3]) >> (4 * i)) & 0xF
                byte = src[n & 7] if not n & 8 else 0xFF * (src[n & 7] >> 7)
                out |= byte << (8 * i)
            regs[args[0]] = out
        elif op == "shl.b32":
            regs[args[0]] = (val(args[1]) << val(args[2])) & 0xFFFFFFFF
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "mul.rn.bf16x2":
            regs[args[0]] = bf16_mul(val(args[1]), val(args[2]))
        else:
            assert op in ("{", "}", ".reg"), f"the model knows no {op!r}: extend it with the PTX"
    return [regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16]


def test_the_e4m3_to_bf16_ptx_is_exact_for_every_code_but_nan():
    """The converter's fp8 -> bf16 widening (integer work and one multiply, not Triton's F2F conversions), modelled
    on the CPU from its PTX text: every e4m3 code gives torch's bf16 bit for bit (subnormals, -0 and +-448
    included); the two NaN codes, which spool's KV writes never store, read as +-480. The GPU test below runs it."""
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    got = []
    for c in range(0, 256, 4):
        got += _run_e4m3_ptx(c | (c + 1) << 8 | (c + 2) << 16 | (c + 3) << 24)
    nan = (codes & 0x7F) == 0x7F
    assert [g for g, n in zip(got, nan) if not n] == want[~nan].tolist()
    got_nan = torch.tensor([g for g, n in zip(got, nan) if n], dtype=torch.int32).to(torch.int16)
    assert got_nan.view(torch.bfloat16).tolist() == [480.0, -480.0]


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


if prefill_hopper.gluon is not None:
    gl = prefill_hopper.gl

    @prefill_hopper.gluon.jit
    def _widen_kernel(src, dst, DTYPE: gl.constexpr):
        offs = gl.arange(0, 256, layout=gl.BlockedLayout([8], [32], [1], [0]))
        gl.store(dst + offs, prefill_hopper._widen(gl.load(src + offs), DTYPE))


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_widening_is_exact_for_every_e4m3_code_but_nan(dtype):
    """The converter's fp8 -> q's dtype widening (prefill_hopper._widen: E4M3_TO_BF16_PTX for bf16, Triton's
    conversion for fp16) on all 256 codes, bit for bit against torch's; NaN codes read as +-480 in bf16."""
    codes = torch.arange(256, dtype=torch.uint8, device="cuda")
    out = torch.empty(256, dtype=dtype, device="cuda")
    _widen_kernel[(1,)](codes.view(torch.float8_e4m3fn), out, prefill_hopper._gl_dtype(dtype), num_warps=1)
    want = codes.view(torch.float8_e4m3fn).to(dtype)
    nan = want.isnan()
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
    if dtype == torch.bfloat16:
        assert out[nan].tolist() == [480.0, -480.0]


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
    """An fp8 KV cache: prefix tiles widened by the converter warpgroup (prefill_hopper._convert_partition), dead
    rows past each context hold NaN K codes and the largest V code, the chunks' own keys unquantized. Against the
    reference on the same fp8 cache, and within fp8's error of the unquantized cache."""
    seqs = PROMPTS + CHUNKS
    q, k8, v8, bt, sl, qsl, kn, vn, scales, k_hi, v_hi = _fp8_batch(seqs, bs)
    assert prefill_hopper.supported(q, k8, v8, kn, vn)
    ref = reference.paged_attention(q, k8, v8, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, **scales)
    out = torch.zeros_like(ref)
    prefill_hopper.prefill_attention(q, k8, v8, bt, sl, qsl, kn, vn, 128**-0.5, out, block_n=block_n, stages=stages,
                                     persistent=persistent, **scales)
    prompt = _prompt_rows(seqs)
    what = f"fp8 bs={bs} bn={block_n} st={stages} pers={persistent}"
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
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("block_n,stages,persistent", CONFIGS)
def test_gpu_launches_agree_bitwise(block_n, stages, persistent, kv):
    """The kernel is deterministic: ten launches (the first on cold caches, right after compiling) give the same
    bits. A race between the producer warp and the consumers (a stage refilled early, a tile read before it landed),
    or over an fp8 tile's widening (read before the converter warpgroup widened it, or overwritten while still
    read), would show as launches that disagree."""
    seqs = PROMPTS + CHUNKS
    q, kc, vc, bt, sl, qsl, kn, vn, scales = _llama3_batch(seqs, kv != "bf16", seed=7)
    ref = reference.paged_attention(q, kc, vc, bt, sl, qsl, 128**-0.5, k_new=kn, v_new=vn, **scales)
    prompt = _prompt_rows(seqs)
    outs = []
    for _ in range(10):
        torch.cuda.empty_cache()
        out = torch.zeros_like(ref)
        prefill_hopper.prefill_attention(q, kc, vc, bt, sl, qsl, kn, vn, 128**-0.5, out, block_n=block_n,
                                         stages=stages, persistent=persistent, **scales)
        outs.append(out[prompt])
    what = f"{kv} bn={block_n} st={stages} persistent={persistent}"
    assert_close(outs[0], ref[prompt], torch.bfloat16, f"first launch, {what}")
    bad = [i for i, o in enumerate(outs) if not torch.equal(o, outs[0])]
    assert not bad, f"launches {bad} differ from the first ({what})"
