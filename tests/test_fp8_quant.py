"""Per-token FP8 activation quantization: the Triton kernels vs spool.kernels.reference, and the fused producers.

CPU under TRITON_INTERPRET=1 on odd shapes; real shapes (llama3-8b: hidden 4096, intermediate 14336; 70b's
28672) with -m gpu. What is claimed, and checked byte for byte (`torch.equal` on the e4m3 codes and the
float32 scales):
- quantize_per_token_fp8 (kernel) == spool.kernels.reference.quantize_per_token_fp8: amax is exact, both divisions
  are IEEE float32 on both sides, the cast rounds to nearest even;
- the fused rms_norm_quant / fused_add_rms_norm_quant / silu_and_mul_quant == quantize_per_token_fp8 of the
  plain Triton op's output: the same normed or gated values, rounded to the activation dtype, quantized alike.
The plain Triton ops differ from their references by the activation dtype's rounding (tests/test_kernels.py),
so the fused ops vs the reference composition are compared after dequantizing: one e4m3 rounding of a value
the dtype bound moved (at most 1/16 of it plus scale/1024, elementwise).
"""
from __future__ import annotations

import torch

from tests.test_kernels import DEVICE, DTYPES, gpu, needs_cuda, poison  # noqa: F401

import pytest  # noqa: E402

from spool.kernels import reference  # noqa: E402
from spool.kernels.fp8 import FP8_DTYPE, MIN_SCALE  # noqa: E402
from spool.kernels.fp8_quant import quantize_per_token_fp8  # noqa: E402
from spool.kernels.triton_ops import TRITON_OPS as T  # noqa: E402


def assert_same_fp8(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], what: str,
                    one_step_per_million: float = 0.0):
    """Identical e4m3 codes and float32 scales (the shapes included).

    one_step_per_million > 0 lets that many codes per million be one e4m3 step off (same sign): for producers
    whose own fp16/bf16 output may round the other way at a tie in the fused kernel (measured on the H200: 1 code
    of 2,097,152 for fp16 rms_norm_quant at T=512; in bf16 none in the third session, 2 of 8,388,608 at T=2048
    in the fifth).
    """
    (q, s), (rq, rs) = got, want
    assert q.dtype == rq.dtype == FP8_DTYPE and s.dtype == rs.dtype == torch.float32, what
    assert q.shape == rq.shape and s.shape == rs.shape, (what, q.shape, rq.shape, s.shape, rs.shape)
    assert torch.equal(s, rs), f"{what}: scales differ in {int((s != rs).sum())} rows"
    a, b = q.view(torch.uint8).int(), rq.view(torch.uint8).int()
    diff = a != b
    allowed = int(one_step_per_million * diff.numel() / 1e6)
    assert int(diff.sum()) <= allowed, f"{what}: {int(diff.sum())} of {diff.numel()} codes differ ({allowed} allowed)"
    assert int((a - b).abs().max()) <= 1, f"{what}: a code differs by more than one e4m3 step"


def deq(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return pair[0].float() * pair[1]


def assert_one_rounding_of(pair, plain: torch.Tensor, ref: torch.Tensor, what: str):
    """pair quantizes `plain` (the Triton op's output), which is within the dtype bound of `ref`: elementwise,
    |dequantized - ref| <= |plain - ref| + |plain| / 16 + scale / 1024."""
    plain, ref = plain.float(), ref.float()
    bound = (plain - ref).abs() + plain.abs() / 16 + pair[1] / 1024 + 1e-12
    assert torch.all((deq(pair) - ref).abs() <= bound), what


def activations(shape, dtype, device=DEVICE, seed=0) -> torch.Tensor:
    """Rows of very different magnitudes, an all-zero row, a row below the scale floor (amax < 448 * MIN_SCALE),
    and values that round up into the next binade (7.97 -> 8) or land among the subnormals."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows, k = torch.Size(shape[:-1]).numel(), shape[-1]
    x = torch.randn(rows, k, generator=gen) * torch.logspace(-3, 3, rows)[:, None]
    x[0] = 0.0
    if rows > 2 and k >= 4:
        x[1] = torch.randn(k, generator=gen) * 1e-4  # below the floor: scale = MIN_SCALE
        x[2, 0] = 448.0
        x[2, 1:4] = torch.tensor([7.97, -7.97, 1e-3])  # scale 1: rounds up a binade; a subnormal e4m3
    return x.reshape(shape).to(dtype).to(device)


# ---------------------------------------------------------------- quantize_per_token_fp8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,max_block", [((9, 1), 16384), ((7, 33), 16384), ((37, 300), 16384),
                                             ((37, 300), 64), ((5, 1000), 256), ((2, 3, 160), 128)])
def test_quantize_per_token_matches_reference_bit_for_bit(shape, max_block, dtype):
    x = activations(shape, dtype)
    got = quantize_per_token_fp8(x, max_block=max_block)
    assert_same_fp8(got, reference.quantize_per_token_fp8(x), f"{shape} block {max_block} {dtype}")
    if len(shape) == 2 and shape[0] > 2 and shape[1] > 4:
        q, s = got
        assert float(s[0]) == float(s[1]) == float(torch.tensor(MIN_SCALE, dtype=torch.float32))  # the floor
        assert q[0].float().abs().max() == 0 and float(s[2]) == 1.0
        assert q[2, :4].float().tolist() == [448.0, 8.0, -8.0, 0.001953125]  # 1e-3 -> e4m3's smallest step
        big = x.float().abs().amax(-1) >= 448 * MIN_SCALE
        assert torch.all(q[big].float().abs().amax(-1) == 448.0)  # each row's largest value lands on 448


@pytest.mark.parametrize("max_block", [16384, 32])
def test_quantize_per_token_strided_rows_and_empty(max_block):
    wide = activations((6, 3 * 96), torch.bfloat16)
    x = wide[:, 96 : 2 * 96]  # rows with stride 288
    assert_same_fp8(quantize_per_token_fp8(x, max_block=max_block), reference.quantize_per_token_fp8(x), "strided")
    xt = activations((96, 6), torch.float16).t()  # unit stride along the rows: copied
    assert_same_fp8(quantize_per_token_fp8(xt, max_block=max_block), reference.quantize_per_token_fp8(xt), "transposed")
    q, s = quantize_per_token_fp8(torch.empty(0, 64, device=DEVICE))
    assert q.shape == (0, 64) and s.shape == (0, 1)
    for bad in (torch.zeros(3, 0, device=DEVICE), torch.zeros(3, 8, dtype=torch.float64, device=DEVICE)):
        with pytest.raises(ValueError, match="quantize_per_token_fp8"):
            quantize_per_token_fp8(bad)


# ---------------------------------------------------------------- fused producers


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(9, 160), (2, 3, 64), (1, 33)])
def test_rms_norm_quant_equals_quantized_rms_norm(shape, dtype):
    x = activations(shape, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype).to(DEVICE)
    got = T.rms_norm_quant(x, w, 1e-6)
    plain = T.rms_norm(x, w, 1e-6)
    assert_same_fp8(got, quantize_per_token_fp8(plain), f"rms_norm_quant {shape} {dtype}")
    ref = reference.rms_norm(x, w, 1e-6)
    assert_one_rounding_of(got, plain, ref, "rms_norm_quant vs reference")
    assert_same_fp8(reference.rms_norm_quant(x, w, 1e-6), reference.quantize_per_token_fp8(ref), "reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm_quant_equals_quantized_fused_add_rms_norm(dtype):
    x = activations((9, 160), dtype)
    r = torch.randn(9, 160).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(160)).to(dtype).to(DEVICE)
    got, res = T.fused_add_rms_norm_quant(x, r, w, 1e-6)
    plain, plain_res = T.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(res, plain_res)
    assert_same_fp8(got, quantize_per_token_fp8(plain), f"fused_add_rms_norm_quant {dtype}")
    ref, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    assert_one_rounding_of(got, plain, ref, "fused_add_rms_norm_quant vs reference")
    (rq, rs), rres = reference.fused_add_rms_norm_quant(x, r, w, 1e-6)
    assert torch.equal(rres, ref_res)
    assert_same_fp8((rq, rs), reference.quantize_per_token_fp8(ref), "reference")


def test_rms_norm_quant_fp32_weight_and_errors():
    """bf16 rows with a float32 weight normalize to float32 (torch's promotion), then quantize."""
    x = activations((5, 80), torch.bfloat16)
    w = torch.randn(80, device=DEVICE)
    assert_same_fp8(T.rms_norm_quant(x, w, 1e-5), quantize_per_token_fp8(T.rms_norm(x, w, 1e-5)), "promoted")
    with pytest.raises(TypeError, match="rms_norm_quant"):
        T.rms_norm_quant(x.double(), w.double(), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        T.fused_add_rms_norm_quant(x, x[:, :40], w, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,max_block", [((5, 2 * 96), 16384), ((5, 2 * 300), 128), ((2, 3, 2 * 64), 16384)])
def test_silu_and_mul_quant_equals_quantized_silu_and_mul(shape, max_block, dtype):
    x = activations(shape, dtype) / 64  # silu(gate) * up of rows up to 1000 would overflow float16
    got = T.silu_and_mul_quant(x, max_block=max_block)
    plain = T.silu_and_mul(x)
    assert_same_fp8(got, quantize_per_token_fp8(plain), f"silu_and_mul_quant {shape} {max_block} {dtype}")
    ref = reference.silu_and_mul(x)
    assert_one_rounding_of(got, plain, ref, "silu_and_mul_quant vs reference")
    assert_same_fp8(reference.silu_and_mul_quant(x), reference.quantize_per_token_fp8(ref), "reference")
    xs = torch.randn(shape[0], 3 * shape[-1]).to(dtype).to(DEVICE)[:, : shape[-1]]  # strided rows
    assert_same_fp8(T.silu_and_mul_quant(xs, max_block=max_block), quantize_per_token_fp8(T.silu_and_mul(xs)),
                    "strided")
    with pytest.raises(ValueError, match="silu_and_mul_quant"):
        T.silu_and_mul_quant(x[..., :-1])


def test_bench_fp8_quant_section_runs():
    """bench/kernel_speeds.py's fp8quant group on tiny shapes (the CPU smoke run times nothing real)."""
    from bench.kernels_fp8_quant import fp8_quant_section

    rows, results = [], {}
    fp8_quant_section(DEVICE, torch.bfloat16, [3], [96, 160], rows, results, lambda fn, rep: (fn(), 1.0)[1], rep=1)
    assert set(results["fp8_quant"]) == {"T3_K96", "T3_K160", "T3_K96_exact", "T3_K160_exact"}
    assert all(all(v.values()) for k, v in results["fp8_quant"].items() if k.endswith("_exact"))
    case = results["fp8_quant"]["T3_K96"]
    assert set(case) == {"quant torch", "quant triton", "add+norm+quant torch", "add+norm+quant unfused",
                         "add+norm+quant fused", "silu+quant torch", "silu+quant unfused", "silu+quant fused"}
    assert all(v["GB/s"] > 0 for v in case.values()) and len(rows) == 2 * 8


# ---------------------------------------------------------------- real shapes (GPU tier)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [4096, 14336, 28672])
def test_gpu_quantize_per_token_real_shapes(k, dtype):
    x = activations((512, k), dtype, device="cuda")
    want = reference.quantize_per_token_fp8(x)
    assert_same_fp8(quantize_per_token_fp8(x), want, f"T=512 K={k} {dtype}")
    assert_same_fp8(quantize_per_token_fp8(x, max_block=2048), want, f"T=512 K={k} {dtype} chunked")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t", [1, 512, 2048])
def test_gpu_fused_producers_real_shapes(t, dtype):
    hidden, inter = 4096, 14336
    tol = 2.0  # codes per million one step off, in either dtype (see assert_same_fp8)
    x = torch.randn(t, hidden, device="cuda").to(dtype)
    r = torch.randn(t, hidden, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    plain = T.rms_norm(x, w, 1e-5)
    got = T.rms_norm_quant(x, w, 1e-5)
    assert_same_fp8(got, quantize_per_token_fp8(plain), f"rms_norm_quant T={t}", tol)
    assert_one_rounding_of(got, plain, reference.rms_norm(x, w, 1e-5), "rms_norm_quant vs reference")
    got, res = T.fused_add_rms_norm_quant(x, r, w, 1e-5)
    plain, plain_res = T.fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res, plain_res)
    assert_same_fp8(got, quantize_per_token_fp8(plain), f"fused_add_rms_norm_quant T={t}", tol)
    g = torch.randn(t, 2 * inter, device="cuda").to(dtype)
    plain = T.silu_and_mul(g)
    for max_block in (8192, 16384):  # chunks of 4096; one tile
        got = T.silu_and_mul_quant(g, max_block=max_block)
        assert_same_fp8(got, quantize_per_token_fp8(plain), f"silu_and_mul_quant T={t} block {max_block}", tol)
    assert_one_rounding_of(got, plain, reference.silu_and_mul(g), "silu_and_mul_quant vs reference")
