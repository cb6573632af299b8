"""Kernel benchmark: paged-attention decode bandwidth vs device copy and SDPA, prefill, small kernels, FP8 quantize.

Usage (CUDA only):  python bench/kernel_speeds.py [--batch 64 --ctx 4096 --hq 32 --hk 8 --head-dim 128
                    --dtype bf16 --block-size 16] [--sweep] [--prefill-sweep] [--json OUT]

One default run reports (issue 17's targets): decode with a bf16 and an fp8 KV cache vs SDPA on bf16 KV
(fp8 target: 1.8x), and prefill attention TFLOP/s at --prefill-len 2048 with 0 and 2048 cached tokens,
bf16 and fp8 KV, each as a percentage of SDPA causal at 2048 tokens (target: 90%).

Decode bandwidth = (K + V bytes of every context + q bytes + out bytes) / median time
(triton.testing.do_bench). It is compared with a device-to-device copy of a large buffer
(read + written bytes / time) and with torch SDPA on contiguous KV of the same shape, in its
fastest fair form (GQA via enable_gqa, or the group's query heads folded into the query length;
both read each KV head once). Inputs are random; several cache sets are rotated when one set
would fit in L2. --sweep times a grid of decode tile configs and split counts.

The fp8quant group (bench/kernels_fp8_quant.py) times per-token FP8 activation quantization at --fp8-tokens x
--fp8-widths: torch ops vs the Triton kernel, and the fused add+RMSNorm+quantize and SiLU-and-mul+quantize
kernels vs their unfused forms. Only that group: --skip decode prefill small.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # spool and bench from this checkout

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
L2_BYTES = 50 * 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="decode sequences")
    p.add_argument("--ctx", type=int, default=4096, help="decode context length per sequence")
    p.add_argument("--hq", type=int, default=32, help="query heads")
    p.add_argument("--hk", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--block-size", type=int, default=16, help="KV cache page size (tokens)")
    p.add_argument("--splits", type=int, default=None, help="force the decode split-KV factor (default: heuristic)")
    p.add_argument("--prefill-len", type=int, default=2048, help="new tokens of the prefill chunk")
    p.add_argument("--prefill-prefixes", type=int, nargs="+", default=[0, 2048],
                   help="cached tokens before the prefill chunk (one measurement each)")
    p.add_argument("--kv-dtypes", nargs="+", choices=["auto", "fp8"], default=["auto", "fp8"],
                   help="KV cache types for the attention measurements (auto: --dtype)")
    p.add_argument("--tokens", type=int, default=2048, help="rows for the small kernels")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    p.add_argument("--sweep", action="store_true", help="also sweep decode block_n x warps x stages x splits")
    p.add_argument("--prefill-sweep", action="store_true",
                   help="also sweep prefill block_m x block_n x warps x stages (2048 tokens, each KV dtype)")
    p.add_argument("--fp8-tokens", type=int, nargs="+", default=[512, 2048], help="rows for the fp8quant group")
    p.add_argument("--fp8-widths", type=int, nargs="+", default=[4096, 14336],
                   help="row widths K for the fp8quant group")
    p.add_argument("--skip", nargs="*", default=[], choices=["sdpa", "decode", "prefill", "small", "fp8quant"],
                   help="parts to skip")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check this script on CPU: tiny shapes, TRITON_INTERPRET=1, one untimed-quality call each")
    return p.parse_args(argv)


DEV = "cuda"


def bench(fn, rep: int) -> float:
    """Median milliseconds."""
    if DEV == "cpu":  # --cpu-smoke: one call, wall clock
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rotating(fns):
    """One callable cycling through several, so each call touches a different working set."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


def interleaved(fa, fb, rep: int, rounds: int) -> tuple[float, float]:
    """Median over `rounds` alternating timings of fa and fb (each itself a median): drift hits both alike."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(bench(fa, rep))
        tb.append(bench(fb, rep))
    return sorted(ta)[rounds // 2], sorted(tb)[rounds // 2]


def copy_bandwidth(rep: int) -> float:
    """Device-to-device copy GB/s, counting bytes read + written."""
    n = 1 << 30 if DEV == "cuda" else 1 << 20
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep)
    del src, dst
    return 2 * n / ms / 1e6


def make_paged(batch, ctx, hq, hk, d, bs, dtype, qlen=1, gen=None, head_major=False):
    """Random paged batch: every sequence has `qlen` new tokens and `ctx` tokens of context, scattered pages.

    head_major: the caches are [blocks, Hk, block_size, D] in memory (each page of one head contiguous),
    passed as [blocks, block_size, Hk, D] views.
    """
    nb_seq = math.ceil(ctx / bs)
    num_blocks = batch * nb_seq
    shape = (num_blocks, hk, bs, d) if head_major else (num_blocks, bs, hk, d)
    k_cache = torch.randn(*shape, device=DEV, dtype=dtype, generator=gen)
    v_cache = torch.randn(*shape, device=DEV, dtype=dtype, generator=gen)
    if head_major:
        k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    bt = torch.randperm(num_blocks, device=DEV, generator=gen).to(torch.int32).view(batch, nb_seq)
    q = torch.randn(batch * qlen, hq, d, device=DEV, dtype=dtype, generator=gen)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    qsl = torch.arange(0, batch * qlen + 1, qlen, dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, bt, seq_lens, qsl


def to_kv_dtype(paged, kv: str):
    """A make_paged batch with its caches converted to the KV type `kv` ('auto' keeps them)."""
    if kv == "auto":
        return paged
    q, kc, vc, *rest = paged
    return (q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), *rest)


def decode_section(a, dtype, rows, results, copy_gbs):
    from spool.kernels.paged_attention import AttnConfig, default_config, paged_attention
    from spool.kernels.reference import paged_attention as reference_paged_attention

    b, ctx, hq, hk, d = a.batch, a.ctx, a.hq, a.hk, a.head_dim
    esz = torch.tensor([], dtype=dtype).element_size()
    kv_bytes = 2 * b * ctx * hk * d * esz
    moved = kv_bytes + 2 * b * hq * d * esz
    nsets = max(1, min(8, math.ceil(4 * L2_BYTES / kv_bytes)))
    gen = torch.Generator(device=DEV).manual_seed(0)
    sets = [make_paged(b, ctx, hq, hk, d, a.block_size, dtype, gen=gen) for _ in range(nsets)]
    scale = d**-0.5

    def run(cfg=None, splits=a.splits):
        return rotating([lambda s=s: paged_attention(*s, scale, max_query_len=1, max_seq_len=ctx, num_splits=splits,
                                                     config=cfg) for s in sets])

    ms = bench(run(), a.rep)
    gbs = moved / ms / 1e6
    rows.append(("paged decode (triton)", ms, gbs, f"{100 * gbs / copy_gbs:.1f}% of copy"))
    results["decode"] = {"ms": ms, "GB/s": gbs, "pct_of_copy": 100 * gbs / copy_gbs, "kv_sets": nsets}

    if "sdpa" not in a.skip:
        import torch.nn.functional as F

        g = hq // hk
        sd = []
        for s in sets:  # contiguous KV with the same bytes: [B, Hk, ctx, D]
            q = s[0].view(b, hq, 1, d)
            k = torch.randn(b, hk, ctx, d, device=DEV, dtype=dtype, generator=gen)
            v = torch.randn_like(k)
            sd.append((q, k, v))
        forms = {
            "enable_gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
            "group-as-queries": lambda q, k, v: F.scaled_dot_product_attention(q.view(b, hk, g, d), k, v, scale=scale),
        }
        best = best_fn = None
        for name, f in forms.items():
            fn = rotating([lambda x=x, f=f: f(*x) for x in sd])
            try:
                t = bench(fn, a.rep)
            except RuntimeError as e:  # a backend may refuse a form
                print(f"sdpa {name}: {e}", file=sys.stderr)
                continue
            rows.append((f"sdpa decode ({name})", t, moved / t / 1e6, f"triton x{t / ms:.2f} faster" if t > ms else
                         f"triton x{ms / t:.2f} slower"))
            results[f"sdpa_{name}"] = {"ms": t, "GB/s": moved / t / 1e6}
            if best is None or t < best:
                best, best_fn = t, fn
        if best is not None:
            results["decode"]["speedup_vs_best_sdpa"] = best / ms
            # One pair of medians differs by ~1-2% from run to run: alternate the two, several rounds.
            tri_ms, sdpa_ms = interleaved(run(), best_fn, a.rep, rounds=7)
            rows.append(("paged vs best sdpa, 7 alternating rounds", tri_ms, moved / tri_ms / 1e6,
                         f"sdpa {sdpa_ms * 1e3:.1f} us: triton x{sdpa_ms / tri_ms:.3f}"))
            results["decode_vs_sdpa_interleaved"] = {"triton_ms": tri_ms, "sdpa_ms": sdpa_ms,
                                                     "speedup": sdpa_ms / tri_ms}
            # The same kernel over head-major caches (each page of one KV head contiguous in memory).
            hm_sets = [make_paged(b, ctx, hq, hk, d, a.block_size, dtype, gen=gen, head_major=True)
                       for _ in range(nsets)]
            hm = rotating([lambda s=s: paged_attention(*s, scale, max_query_len=1, max_seq_len=ctx,
                                                       num_splits=a.splits) for s in hm_sets])
            hm_ms, sdpa_ms = interleaved(hm, best_fn, a.rep, rounds=7)
            rows.append(("paged head-major cache vs sdpa, 7 rounds", hm_ms, moved / hm_ms / 1e6,
                         f"sdpa {sdpa_ms * 1e3:.1f} us: triton x{sdpa_ms / hm_ms:.3f}"))
            results["decode_head_major_vs_sdpa"] = {"triton_ms": hm_ms, "sdpa_ms": sdpa_ms, "speedup": sdpa_ms / hm_ms}
            q, kc, vc, bt, sl, qsl = hm_sets[0]
            sub = (q[:4], kc, vc, bt[:4], sl[:4], qsl[:5], scale)
            ref = reference_paged_attention(*sub).float()
            err = float((paged_attention(*sub).float() - ref).norm() / ref.norm())
            rows.append(("  head-major rel err vs reference (4 seqs)", None, None, f"{err:.2e}"))
            del hm_sets
            if "fp8" in a.kv_dtypes:  # issue 17: fp8 KV decode vs SDPA on bf16 KV (target 1.8x)
                fp8_sets = [to_kv_dtype(s, "fp8") for s in sets]
                f8 = rotating([lambda s=s: paged_attention(*s, scale, max_query_len=1, max_seq_len=ctx,
                                                           num_splits=a.splits) for s in fp8_sets])
                f8_moved = kv_bytes // esz + 2 * b * hq * d * esz  # one byte per cached element
                f8_ms = bench(f8, a.rep)
                rows.append(("paged decode fp8 KV (triton)", f8_ms, f8_moved / f8_ms / 1e6,
                             f"{100 * f8_moved / f8_ms / 1e6 / copy_gbs:.1f}% of copy"))
                f8_ms, sdpa_ms = interleaved(f8, best_fn, a.rep, rounds=7)
                rows.append(("paged fp8 KV vs sdpa bf16 KV, 7 rounds", f8_ms, f8_moved / f8_ms / 1e6,
                             f"sdpa {sdpa_ms * 1e3:.1f} us: triton x{sdpa_ms / f8_ms:.3f} (target x1.8)"))
                q, kc, vc, bt, sl, qsl = fp8_sets[0]
                sub = (q[:4], kc, vc, bt[:4], sl[:4], qsl[:5], scale)
                ref = reference_paged_attention(*sub).float()
                err = float((paged_attention(*sub).float() - ref).norm() / ref.norm())
                rows.append(("  fp8 decode rel err vs reference (4 seqs)", None, None, f"{err:.2e}"))
                results["decode_fp8_vs_sdpa_bf16"] = {"triton_ms": f8_ms, "sdpa_ms": sdpa_ms,
                                                      "speedup": sdpa_ms / f8_ms, "GB/s": f8_moved / f8_ms / 1e6,
                                                      "rel_err_vs_reference": err}
                del fp8_sets

    from spool.kernels import reference  # sanity check on 4 sequences of the first set

    q, kc, vc, bt, sl, qsl = sets[0]
    sub = (q[:4], kc, vc, bt[:4], sl[:4], qsl[:5], scale)
    ref = reference.paged_attention(*sub).float()
    err = float((paged_attention(*sub).float() - ref).norm() / ref.norm())
    rows.append(("  decode rel err vs reference (4 seqs)", None, None, f"{err:.2e}"))
    results["decode"]["rel_err_vs_reference"] = err

    if a.sweep:
        sweep = []
        base = default_config(True, d, hq // hk, dtype)
        fp8_sets = [to_kv_dtype(s, "fp8") for s in sets] if "fp8" in a.kv_dtypes else []

        def run_fp8(cfg, splits):
            return rotating([lambda s=s: paged_attention(*s, scale, max_query_len=1, max_seq_len=ctx,
                                                         num_splits=splits, config=cfg) for s in fp8_sets])

        # fp8 tiles carry half the bytes per token, so its grid reaches longer tiles and deeper pipelines to keep
        # as many bytes in flight as bf16 does; B=64 x 8 KV heads already fills the SMs, so one split.
        # f16: widen e4m3 to fp16 (one cvt per pair) rather than to q's bf16 (the kernel's default is fp16).
        grid8 = [(bn, w, st, True) for bn, w, st in itertools.product((64, 128), (2, 4), (4, 6, 8))]
        grid8.append((64, 2, 6, False))  # the best bf16-widening tile of the earlier sweep, for reference
        for bn, w, st, f16 in grid8 if fp8_sets else ():
            cfg = AttnConfig(block_m=base.block_m, block_n=bn, num_warps=w, num_stages=st, fp8_f16_dot=f16)
            try:
                t8 = bench(run_fp8(cfg, 1), max(50, a.rep // 4))
                results.setdefault("decode_sweep_fp8", []).append(
                    {"block_n": bn, "num_warps": w, "num_stages": st, "splits": 1, "fp8_f16_dot": f16, "ms": t8})
            except Exception as e:  # out of shared memory or registers
                print(f"fp8 sweep {cfg}: {type(e).__name__}", file=sys.stderr)
        grid = itertools.product((64, 128), (2, 4), (3, 4, 5), (1, 2)) if "auto" in a.kv_dtypes else ()
        for bn, w, st, sp in grid:
            cfg = AttnConfig(block_m=base.block_m, block_n=bn, num_warps=w, num_stages=st)
            try:
                t = bench(run(cfg, sp), max(50, a.rep // 4))
            except Exception as e:  # out of shared memory etc.
                print(f"sweep {cfg} splits={sp}: {type(e).__name__}", file=sys.stderr)
                continue
            sweep.append({"block_n": bn, "num_warps": w, "num_stages": st, "splits": sp, "ms": t,
                          "GB/s": moved / t / 1e6})
        sweep.sort(key=lambda r: r["ms"])
        results["decode_sweep"] = sweep
        f8_moved = kv_bytes // esz + 2 * b * hq * d * esz
        fp8_sweep = sorted(results.get("decode_sweep_fp8", []), key=lambda r: r["ms"])
        leaders = fp8_sweep[:6] + [r for r in fp8_sweep[6:] if not r["fp8_f16_dot"]][:2]  # bf16-widening's best too
        for r in leaders:
            gbs = f8_moved / r["ms"] / 1e6
            rows.append((f"  fp8 sweep bn={r['block_n']} w={r['num_warps']} st={r['num_stages']} sp={r['splits']} "
                         f"{'f16' if r['fp8_f16_dot'] else 'bf16'}", r["ms"], gbs, f"{100 * gbs / copy_gbs:.1f}% of copy"))
        if fp8_sweep and "sdpa" not in a.skip and best_fn is not None:
            r = fp8_sweep[0]
            cfg = AttnConfig(block_m=base.block_m, block_n=r["block_n"], num_warps=r["num_warps"],
                             num_stages=r["num_stages"], fp8_f16_dot=r["fp8_f16_dot"])
            f8_ms, sdpa_ms = interleaved(run_fp8(cfg, r["splits"]), best_fn, a.rep, rounds=5)
            r["interleaved"] = {"triton_ms": f8_ms, "sdpa_ms": sdpa_ms, "speedup": sdpa_ms / f8_ms}
            rows.append((f"  fp8 leader bn={r['block_n']} w={r['num_warps']} st={r['num_stages']} sp={r['splits']} "
                         "vs sdpa bf16 x5", f8_ms, f8_moved / f8_ms / 1e6,
                         f"sdpa {sdpa_ms * 1e3:.1f} us: x{sdpa_ms / f8_ms:.3f} (target x1.8)"))
        for r in sweep[:8]:
            rows.append((f"  sweep bn={r['block_n']} w={r['num_warps']} st={r['num_stages']} sp={r['splits']}",
                         r["ms"], r["GB/s"], f"{100 * r['GB/s'] / copy_gbs:.1f}% of copy"))
        if "sdpa" not in a.skip and best_fn is not None:
            for r in sweep[:3]:  # the leaders again, alternating with SDPA
                cfg = AttnConfig(block_m=base.block_m, block_n=r["block_n"], num_warps=r["num_warps"],
                                 num_stages=r["num_stages"])
                tri_ms, sdpa_ms = interleaved(run(cfg, r["splits"]), best_fn, a.rep, rounds=5)
                r["interleaved"] = {"triton_ms": tri_ms, "sdpa_ms": sdpa_ms, "speedup": sdpa_ms / tri_ms}
                rows.append((f"  leader bn={r['block_n']} w={r['num_warps']} st={r['num_stages']} sp={r['splits']} "
                             "vs sdpa x5", tri_ms, moved / tri_ms / 1e6,
                             f"sdpa {sdpa_ms * 1e3:.1f} us: x{sdpa_ms / tri_ms:.3f}"))


def _prefill_batch(a, dtype, n: int, pre: int, kv: str, gen):
    """One sequence: n new tokens after pre cached ones, paged, KV in `kv`."""
    q, kc, vc, bt, sl, _ = to_kv_dtype(make_paged(1, n + pre, a.hq, a.hk, a.head_dim, a.block_size, dtype, gen=gen),
                                       kv)
    q = torch.randn(n, a.hq, a.head_dim, device=DEV, dtype=dtype, generator=gen)
    qsl = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    return q, kc, vc, bt, sl, qsl


def _causal_flops(hq: int, d: int, n: int, pre: int) -> float:
    """4 * Hq * D per visible (query, key) pair: n queries after pre cached keys, causal."""
    return 4 * hq * d * (n * pre + n * (n + 1) / 2)


def prefill_section(a, dtype, rows, results):
    """Paged prefill TFLOP/s for each (prefix, KV dtype) vs SDPA causal on n contiguous tokens."""
    import torch.nn.functional as F

    from spool.kernels import reference
    from spool.kernels.paged_attention import paged_attention

    hq, hk, d, n = a.hq, a.hk, a.head_dim, a.prefill_len
    scale = d**-0.5
    gen = torch.Generator(device=DEV).manual_seed(1)
    sdpa_tflops = None
    if "sdpa" not in a.skip:
        qs = torch.randn(1, hq, n, d, device=DEV, dtype=dtype, generator=gen)
        ks = torch.randn(1, hk, n, d, device=DEV, dtype=dtype, generator=gen)
        vs = torch.randn_like(ks)
        t = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True),
                  a.rep)
        sdpa_tflops = _causal_flops(hq, d, n, 0) / t / 1e9
        rows.append((f"sdpa prefill causal {n} (contiguous)", t, None, f"{sdpa_tflops:.1f} TFLOP/s"))
        results["sdpa_prefill"] = {"ms": t, "TFLOP/s": sdpa_tflops, "tokens": n}
        for pre in (p for p in a.prefill_prefixes if p > 0):  # SDPA over a prefix: bottom-right causal mask
            try:
                from torch.nn.attention.bias import causal_lower_right

                kp = torch.randn(1, hk, n + pre, d, device=DEV, dtype=dtype, generator=gen)
                vp = torch.randn_like(kp)
                mask = causal_lower_right(n, n + pre)
                t = bench(lambda: F.scaled_dot_product_attention(qs, kp, vp, attn_mask=mask, scale=scale,
                                                                 enable_gqa=True), a.rep)
            except (ImportError, RuntimeError, TypeError) as e:  # a backend may refuse GQA with this mask
                print(f"sdpa prefill +{pre}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            tf = _causal_flops(hq, d, n, pre) / t / 1e9
            rows.append((f"sdpa prefill {n} (+{pre} cached, lower-right causal)", t, None, f"{tf:.1f} TFLOP/s"))
            results[f"sdpa_prefill_prefix{pre}"] = {"ms": t, "TFLOP/s": tf}
            del kp, vp
    results["prefill"] = {}
    for pre in a.prefill_prefixes:
        for kv in a.kv_dtypes:
            batch = _prefill_batch(a, dtype, n, pre, kv, gen)
            ctx = n + pre
            ms = bench(lambda: paged_attention(*batch, scale, max_query_len=n, max_seq_len=ctx), a.rep)
            tf = _causal_flops(hq, d, n, pre) / ms / 1e9
            pct = None if sdpa_tflops is None else 100 * tf / sdpa_tflops
            note = f"{tf:.1f} TFLOP/s" + ("" if pct is None else f", {pct:.0f}% of sdpa causal {n} (target 90%)")
            ref = reference.paged_attention(*batch, scale).float()
            err = float((paged_attention(*batch, scale).float() - ref).norm() / ref.norm())
            name = a.dtype if kv == "auto" else kv
            rows.append((f"paged prefill {n} (+{pre} cached) {name} KV", ms, None, f"{note}; rel err {err:.1e}"))
            results["prefill"][f"{name}+{pre}"] = {"ms": ms, "TFLOP/s": tf, "pct_of_sdpa_causal": pct,
                                                  "tokens": n, "prefix": pre, "kv": name, "rel_err": err}
            del batch
    if a.prefill_sweep:
        prefill_sweep(a, dtype, rows, results, sdpa_tflops, gen)


def prefill_sweep(a, dtype, rows, results, sdpa_tflops, gen):
    """Time prefill tile configs at +0 cached for each KV dtype; re-time the 3 leaders at the largest prefix."""
    from spool.kernels.paged_attention import AttnConfig, paged_attention

    hq, d, n = a.hq, a.head_dim, a.prefill_len
    group = hq // a.hk
    scale = d**-0.5
    shapes = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    grid = [AttnConfig(bm, bn, w, st) for bm, bn, w, st in shapes if bm >= max(16, group) and not (bm == 64 and w == 8)]
    results["prefill_sweep"] = {}
    for kv in a.kv_dtypes:
        name = a.dtype if kv == "auto" else kv
        batch = _prefill_batch(a, dtype, n, 0, kv, gen)
        timed = []
        for cfg in grid:
            try:
                t = bench(lambda: paged_attention(*batch, scale, max_query_len=n, max_seq_len=n, config=cfg),
                          max(50, a.rep // 4))
            except Exception as e:  # out of shared memory / registers
                print(f"prefill sweep {cfg} {name}: {type(e).__name__}", file=sys.stderr)
                continue
            timed.append((t, cfg))
        timed.sort(key=lambda x: x[0])
        flops = _causal_flops(hq, d, n, 0)
        out = results["prefill_sweep"][name] = []
        for t, cfg in timed:
            out.append({"block_m": cfg.block_m, "block_n": cfg.block_n, "num_warps": cfg.num_warps,
                        "num_stages": cfg.num_stages, "ms": t, "TFLOP/s": flops / t / 1e9})
        for t, cfg in timed[:5]:
            tf = flops / t / 1e9
            pct = "" if sdpa_tflops is None else f", {100 * tf / sdpa_tflops:.0f}% of sdpa"
            rows.append((f"  prefill sweep {name} +0 bm={cfg.block_m} bn={cfg.block_n} w={cfg.num_warps} "
                         f"st={cfg.num_stages}", t, None, f"{tf:.1f} TFLOP/s{pct}"))
        pre = max(a.prefill_prefixes)
        if pre > 0:
            batch = _prefill_batch(a, dtype, n, pre, kv, gen)
            for _, cfg in timed[:3]:
                t = bench(lambda: paged_attention(*batch, scale, max_query_len=n, max_seq_len=n + pre, config=cfg),
                          a.rep)
                tf = _causal_flops(hq, d, n, pre) / t / 1e9
                rows.append((f"  leader {name} +{pre} bm={cfg.block_m} bn={cfg.block_n} w={cfg.num_warps} "
                             f"st={cfg.num_stages}", t, None, f"{tf:.1f} TFLOP/s"))
        del batch


def small_section(a, dtype, rows, results):
    from spool.kernels import reference
    from spool.kernels.triton_ops import TRITON_OPS as T

    t, h, inter, hq, hk, d = a.tokens, a.hidden, a.intermediate, a.hq, a.hk, a.head_dim
    esz = torch.tensor([], dtype=dtype).element_size()
    dev = DEV
    x = torch.randn(t, h, device=dev, dtype=dtype)
    r = torch.randn(t, h, device=dev, dtype=dtype)
    w = torch.randn(h, device=dev, dtype=dtype)
    g = torch.randn(t, 2 * inter, device=dev, dtype=dtype)
    qkv = torch.randn(t, hq + 2 * hk, d, device=dev, dtype=dtype)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    pos = torch.randint(0, 8192, (t,), device=dev)
    cs = torch.randn(8192, d, device=dev)
    nblk = math.ceil(4 * t / a.block_size)
    kc = torch.zeros(nblk, a.block_size, hk, d, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(nblk * a.block_size, device=dev)[:t]
    kc8, vc8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    cases = {  # name: (triton fn, torch fn, bytes moved)
        "rms_norm": (lambda: T.rms_norm(x, w, 1e-5), lambda: reference.rms_norm(x, w, 1e-5), 2 * t * h * esz),
        "fused_add_rms_norm": (lambda: T.fused_add_rms_norm(x, r, w, 1e-5),
                               lambda: reference.fused_add_rms_norm(x, r, w, 1e-5), 4 * t * h * esz),
        "silu_and_mul": (lambda: T.silu_and_mul(g), lambda: reference.silu_and_mul(g), 3 * t * inter * esz),
        "rotary": (lambda: T.rotary_embedding(pos, q, k, cs), lambda: reference.rotary_embedding(pos, q, k, cs),
                   2 * t * (hq + hk) * d * esz),
        "write_kv_cache": (lambda: T.write_kv_cache(k, v, kc, vc, slots),
                           lambda: reference.write_kv_cache(k, v, kc, vc, slots), 4 * t * hk * d * esz),
        "write_kv_cache fp8": (lambda: T.write_kv_cache(k, v, kc8, vc8, slots, 0.05, 0.05),
                               lambda: reference.write_kv_cache(k, v, kc8, vc8, slots, 0.05, 0.05),
                               2 * t * hk * d * (esz + 1)),
    }
    for name, (tri, ref, nbytes) in cases.items():
        mt, mr = bench(tri, a.rep), bench(ref, a.rep)
        rows.append((f"{name} [{t} rows]", mt, nbytes / mt / 1e6, f"torch {mr * 1e3:.1f} us (x{mr / mt:.2f})"))
        results[name] = {"ms": mt, "GB/s": nbytes / mt / 1e6, "torch_ms": mr}


def main(argv=None) -> int:
    global DEV
    a = parse_args(argv)
    if a.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEV = "cpu"
        a.batch, a.ctx, a.hq, a.hk, a.head_dim, a.prefill_len = 3, 100, 8, 2, 64, 40
        a.prefill_prefixes = [0, 24]
        a.tokens, a.hidden, a.intermediate = 8, 256, 512
        a.fp8_tokens, a.fp8_widths = [8], [256, 300]
        a.sweep = a.prefill_sweep = False
    elif not torch.cuda.is_available():
        print("bench/kernel_speeds.py needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    dtype = DTYPES[a.dtype]
    import triton

    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke run)"
    results = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "args": vars(a)}
    rows: list[tuple] = []
    copy_gbs = copy_bandwidth(a.rep)
    rows.append(("device copy 1 GiB (read+write)", None, copy_gbs, ""))
    results["copy_GB/s"] = copy_gbs
    if "decode" not in a.skip:
        decode_section(a, dtype, rows, results, copy_gbs)
    if "prefill" not in a.skip:
        prefill_section(a, dtype, rows, results)
    if "small" not in a.skip:
        small_section(a, dtype, rows, results)
    if "fp8quant" not in a.skip:
        from bench.kernels_fp8_quant import fp8_quant_section

        fp8_quant_section(DEV, dtype, a.fp8_tokens, a.fp8_widths, rows, results, bench, a.rep)

    print(f"{results['device']}  torch {torch.__version__}  triton {triton.__version__}  "
          f"decode B={a.batch} ctx={a.ctx} Hq={a.hq} Hk={a.hk} D={a.head_dim} {a.dtype} page={a.block_size}")
    print(f"{'kernel':44s} {'median us':>10s} {'GB/s':>9s}  note")
    for name, ms, gbs, note in rows:
        us = "" if ms is None else f"{ms * 1e3:.1f}"
        print(f"{name:44s} {us:>10s} {'' if gbs is None else f'{gbs:.0f}':>9s}  {note}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
