"""Paged attention at the bulk workload's own shapes, and the prefill path's variants. Needs a CUDA GPU.

  python bench/attn_workload.py [--json OUT] [--skip decode prefill host] [--decode-sweep] [--quick]

bench/kernel_speeds.py times the issue's fixed shapes (decode B=64 x 4096, one 2048-token prefill). This times what a
llama3-8b bulk step actually runs (32/8 heads, d128):
- decode: 512 sequences whose contexts are the workload's prompts U[128,1024] plus a few decoded tokens
  (ragged, short: per-program fixed costs weigh more than at 4096), bf16 and fp8 KV (fp8: V row-major as
  the engine stores it, and "fp8-keysV", stored keys-fastest: spool.kernels.kv_layout), GB/s of K/V read and
  % of the device copy rate; --decode-sweep times tiles x warps x stages for each KV dtype; on Hopper, fp8 rows
  also time spool.kernels.decode_hopper (Gluon) at each --gluon-decode-stages; --graphs times CUDA graph replays
  (GPU time only: the engine's decode steps replay graphs, and the Gluon launch's host cost can exceed ~150 us).
- prefill: 2048 new tokens after 0 or 2048 cached ones, and an 8,192-token step of ~14 fresh prompts
  U[128,1024]: the old all-pages read against the step's own keys read from the fused qkv (k/v_new) by
  pointers or by bulk tensor copies (TMA), bf16 and fp8 KV, with SDPA causal on 2048 contiguous tokens as the
  yardstick (issue 17's 90% target), and spool.kernels.prefill_hopper's Gluon kernel (Hopper; bf16 and fp8 KV) in
  each of its tile shapes, persistent or one program per work item;
  --quick: of the Triton kernel's tiles, only the default and the 128 x 128 TMA ones.
- host: host time per call of a prompt step (Gluon vs Triton prompt kernels), with a profile of the Gluon call.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from spool.kernels.kv_layout import allocate_kv_cache  # noqa: E402

HQ, HK, D = 32, 8, 128
FP8 = torch.float8_e4m3fn


def bench(fn, rep: int = 100) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def paged(ctxs: list[int], qlens: list[int], bs: int, dtype, kv: str, gen):
    """Random pages for sequences of context ctxs (incl. their qlens new tokens); q, k/v_new views of one qkv."""
    nb = [math.ceil(c / bs) for c in ctxs]
    total = sum(nb) + 1
    kc = torch.randn(total, bs, HK, D, device="cuda", dtype=dtype, generator=gen)
    vc = torch.randn_like(kc)
    if kv.startswith("fp8"):
        kc, vc = kc.to(FP8), vc.to(FP8)
        if kv == "fp8-keysV":  # V stored keys-fastest (spool.kernels.kv_layout); "fp8": row-major, as the engine has it
            v_keys = allocate_kv_cache(total, bs, HK, D, FP8, "cuda", v_keys_fastest=True)[1]
            v_keys.view(torch.uint8).copy_(vc.view(torch.uint8))
            vc = v_keys
    perm = torch.randperm(total - 1, device="cuda", generator=gen).to(torch.int32) + 1
    bt = torch.zeros(len(ctxs), max(nb), dtype=torch.int32, device="cuda")
    at = 0
    for i, n in enumerate(nb):
        bt[i, :n] = perm[at:at + n]
        at += n
    t = sum(qlens)
    qkv = torch.randn(t, HQ + 2 * HK, D, device="cuda", dtype=dtype, generator=gen)
    q, kn, vn = qkv[:, :HQ], qkv[:, HQ:HQ + HK], qkv[:, HQ + HK:]
    sl = torch.tensor(ctxs, dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0] + list(itertools.accumulate(qlens)), dtype=torch.int32, device="cuda")
    return q, kc, vc, bt, sl, qsl, kn, vn


def graphed(fn):
    """fn captured in a CUDA graph (after one eager call: compiles) and returned as its replay: GPU time without
    the host's launch cost, as the engine's decode steps run."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_gbs() -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), 200)
    return 2 * n / ms / 1e6


def decode_section(a, res: dict, rows: list) -> None:
    from spool.kernels import decode_hopper
    from spool.kernels.paged_attention import AttnConfig, default_config, keys_fastest_pages, paged_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    if a.decode_uniform:
        ctxs = [a.decode_uniform[1]] * a.decode_uniform[0]
        shape = f"{a.decode_uniform[0]} x {a.decode_uniform[1]}"
    else:
        ctxs = (torch.randint(128, 1025, (512,), generator=torch.Generator().manual_seed(0)) + 16).tolist()
        shape = "512 x U[128,1024]"
    cp = copy_gbs()
    res["copy_GB/s"] = cp
    if a.decode_uniform:  # the yardstick: SDPA decode on contiguous bf16 K/V of the same shape
        import torch.nn.functional as F

        b_, c_ = a.decode_uniform
        qs = torch.randn(b_, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        ks = torch.randn(b_, HK, c_, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        vs = torch.randn_like(ks)
        sdpa = functools.partial(F.scaled_dot_product_attention, qs, ks, vs, enable_gqa=True)
        sdpa_ms = bench(graphed(sdpa) if a.graphs else sdpa, 200)
        res["sdpa_decode_ms"] = sdpa_ms
        rows.append(f"sdpa decode {b_} x {c_} bf16 (contiguous): {sdpa_ms * 1e3:.1f} us")
        del qs, ks, vs
    res["decode"] = {}
    for bs in a.block_sizes:
        for kv in ("bf16", "fp8", "fp8-keysV"):
            b = paged(ctxs, [1] * len(ctxs), bs, torch.bfloat16, kv, gen)
            fp8 = kv.startswith("fp8")
            moved = 2 * sum(ctxs) * HK * D * (1 if fp8 else 2)
            base = default_config(True, D, HQ // HK, torch.bfloat16, fp8, keys_fastest_pages(b[2]))
            grid = [base] + [AttnConfig(base.block_m, *c) for c in a.decode_configs]
            if a.warp_specialize:
                grid.append(dataclasses.replace(base, warp_specialize=True))
            if a.decode_sweep and bs == a.block_sizes[0]:
                if fp8:
                    shapes = list(itertools.product((64, 128), (2, 4), (3, 4, 6, 8))) + [(32, w, st) for w in (1, 2)
                                                                                          for st in (4, 8)]
                else:
                    shapes = list(itertools.product((64, 128), (2, 4), (3, 4, 6)))
                grid += [AttnConfig(base.block_m, bn, w, st) for bn, w, st in shapes
                         if (bn, w, st) != (base.block_n, base.num_warps, base.num_stages)]
            out = res["decode"][f"{kv}_bs{bs}"] = []
            for cfg in grid:
                try:
                    call = functools.partial(paged_attention, *b[:6], D**-0.5, max_query_len=1, max_seq_len=1040,
                                             config=cfg)
                    ms = bench(graphed(call) if a.graphs else call)
                except Exception as e:  # out of registers / shared memory
                    print(f"decode {kv} bs{bs} {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                gbs = moved / ms / 1e6
                out.append({"block_n": cfg.block_n, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                            "warp_specialize": cfg.warp_specialize, "ms": ms, "GB/s": gbs,
                            "pct_of_copy": 100 * gbs / cp, "default": cfg == base})
            if fp8 and decode_hopper.supported(b[0], b[1], b[2]):  # the Gluon kernel (what the engine runs here)
                for st in a.gluon_decode_stages:
                    try:
                        call = functools.partial(decode_hopper.decode_attention, *b[:6], D**-0.5,
                                                 torch.empty_like(b[0]), stages=st)
                        ms = bench(graphed(call) if a.graphs else call)
                    except Exception as e:  # out of shared memory
                        print(f"decode {kv} bs{bs} gluon stages={st}: {type(e).__name__}: {e}", file=sys.stderr)
                        continue
                    gbs = moved / ms / 1e6
                    out.append({"gluon_stages": st, "ms": ms, "GB/s": gbs, "pct_of_copy": 100 * gbs / cp,
                                "default": False, "engine": st == decode_hopper.STAGES})
            out.sort(key=lambda r: r["ms"])
            first = [r for r in out if r["default"] or r.get("engine")]
            for r in first + [r for r in out if r not in first][:a.decode_top]:
                vs_sdpa = f", x{res['sdpa_decode_ms'] / r['ms']:.3f} of sdpa" if "sdpa_decode_ms" in res else ""
                tags = ((' ws' if r.get('warp_specialize') else '') + (' (default)' if r['default'] else '')
                        + (' (the engine\'s)' if r.get('engine') else ''))
                tile = (f"gluon st={r['gluon_stages']}{tags}" if "gluon_stages" in r else
                        f"bn={r['block_n']} w={r['num_warps']} st={r['num_stages']}{tags}")
                rows.append(f"decode {shape} {kv} KV bs{bs} {tile}: {r['ms'] * 1e3:.1f} us, "
                            f"{r['GB/s']:.0f} GB/s = {r['pct_of_copy']:.1f}% of copy{vs_sdpa}")
            del b


def prefill_section(a, res: dict, rows: list) -> None:
    import torch.nn.functional as F

    from spool.kernels import prefill_hopper, reference
    from spool.kernels.paged_attention import AttnConfig, default_config, paged_attention

    gen = torch.Generator(device="cuda").manual_seed(1)
    n = 2048
    qs = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    ks = torch.randn(1, HK, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    vs = torch.randn_like(ks)
    flops = lambda pre, m: 4 * HQ * D * (m * pre + m * (m + 1) / 2)  # noqa: E731
    sdpa_ms = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True), 200)
    sdpa = flops(0, n) / sdpa_ms / 1e9
    res["sdpa_causal_2048_TFLOP/s"] = sdpa
    rows.append(f"sdpa causal 2048 (contiguous): {sdpa_ms * 1e3:.1f} us = {sdpa:.1f} TFLOP/s")
    rng = torch.Generator().manual_seed(2)
    step_lens, tot = [], 0  # one 8,192-token prefill step of fresh prompts U[128,1024]
    while tot < 8192:
        ln = min(int(torch.randint(128, 1025, (1,), generator=rng)), 8192 - tot)
        step_lens.append(ln)
        tot += ln
    cases = [("2048+0", [n], [n]), ("2048+2048", [2 * n], [n]), (f"step {len(step_lens)} prompts", step_lens, step_lens)]
    base = default_config(False, D, HQ // HK, torch.bfloat16)
    variants = [("pages", None, base)]
    for cfg in [base, AttnConfig(128, 128, 8, 2), AttnConfig(128, 128, 8, 3), AttnConfig(64, 64, 4, 4),
                AttnConfig(128, 64, 4, 3), AttnConfig(128, 64, 8, 4)]:
        for tma in (True, False):
            variants.append((f"new_kv {'tma' if tma else 'ptr'} bm={cfg.block_m} bn={cfg.block_n} w={cfg.num_warps} "
                             f"st={cfg.num_stages}", tma, AttnConfig(cfg.block_m, cfg.block_n, cfg.num_warps,
                                                                     cfg.num_stages, new_kv_tma=tma)))
    if a.warp_specialize:
        for tma, cfg in ((False, base), (True, AttnConfig(128, 128, 8, 2)), (True, base)):
            variants.append((f"new_kv {'tma' if tma else 'ptr'} ws bm={cfg.block_m} bn={cfg.block_n} "
                             f"w={cfg.num_warps} st={cfg.num_stages}", tma,
                             dataclasses.replace(cfg, new_kv_tma=tma, warp_specialize=True)))
    defaults = {"pages", f"new_kv ptr bm={base.block_m} bn={base.block_n} w={base.num_warps} st={base.num_stages}"}
    res["prefill"] = {}
    for (label, ctxs, qlens), kv in itertools.product(cases, ("bf16", "fp8", "fp8-keysV")):
        b = paged(ctxs, qlens, a.block_sizes[0], torch.bfloat16, kv, gen)
        fl = sum(flops(c - q, q) for c, q in zip(ctxs, qlens))
        ref = reference.paged_attention(*b[:6], D**-0.5, k_new=b[6], v_new=b[7]).float() if label == "2048+0" else None
        out = res["prefill"][f"{label} {kv}"] = []
        gluon = [(f"gluon bn={bn} st={st}{'' if pers else ' grid=items'}", "gluon", (bn, st, pers))
                 for bn, st in prefill_hopper.CONFIGS for pers in (True, False)
                 if prefill_hopper.supported(b[0], b[1], b[2], b[6], b[7])]
        quick = defaults | {"new_kv tma bm=128 bn=128 w=8 st=3"}  # the default tiles, and the best TMA ones
        for name, tma, cfg in variants + gluon:
            if ((kv == "fp8-keysV" and name not in defaults) or (a.quick and name not in quick)) and tma != "gluon":
                continue
            kw = {} if tma is None else {"k_new": b[6], "v_new": b[7]}
            if tma == "gluon":  # spool.kernels.prefill_hopper by itself (every row here is a prompt's)
                o = torch.full_like(b[0], float("nan"))  # rows the kernel misses stay NaN: the error check sees them
                run = functools.partial(prefill_hopper.prefill_attention, *b[:6], b[6], b[7], D**-0.5, o,
                                        block_n=cfg[0], stages=cfg[1], persistent=cfg[2])
            else:
                run = functools.partial(paged_attention, *b[:6], D**-0.5, max_query_len=max(qlens),
                                        max_seq_len=max(ctxs), config=cfg, **kw)
            try:
                ms = bench(run)
                err = None
                if ref is not None and tma is not None:
                    got = run()  # the Gluon kernel writes o and returns None; paged_attention returns its output
                    err = float(((o if tma == "gluon" else got).float() - ref).norm() / ref.norm())
            except Exception as e:
                print(f"prefill {label} {kv} {name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            tf = fl / ms / 1e9
            out.append({"variant": name, "ms": ms, "TFLOP/s": tf, "pct_of_sdpa_causal_2048": 100 * tf / sdpa,
                        "rel_err": err})
        out.sort(key=lambda r: r["ms"])
        pages = [r for r in out if r["variant"] == "pages"]
        shown = pages + [r for r in out if r["variant"] in defaults - {"pages"} or r["variant"].startswith("gluon")]
        for r in shown + [r for r in out if r not in shown][:3]:
            rows.append(f"prefill {label} {kv} KV {r['variant']}: {r['ms'] * 1e3:.1f} us, {r['TFLOP/s']:.1f} TFLOP/s "
                        f"= {r['pct_of_sdpa_causal_2048']:.0f}% of sdpa" +
                        ("" if r["rel_err"] is None else f", rel err {r['rel_err']:.1e}"))
        del b


def host_section(a, res: dict, rows: list) -> None:
    """Host time per paged_attention call on a prompt step (the engine calls it once per layer), prompt chunks on
    the Gluon kernel (spool.kernels.prefill_hopper) and on the Triton one; and where the Gluon call's host time goes
    (cProfile, top functions by own time, in the log)."""
    import cProfile
    import pstats
    import time

    import spool.kernels.paged_attention as pa

    gen = torch.Generator(device="cuda").manual_seed(3)
    lens = [512] * 16
    b = paged(lens, lens, a.block_sizes[0], torch.bfloat16, "bf16", gen)
    out = torch.empty_like(b[0])
    call = functools.partial(pa.paged_attention, *b[:6], D**-0.5, max_query_len=512, max_seq_len=512, k_new=b[6],
                             v_new=b[7], out=out)
    res["host_us_per_call"] = {}
    for name, use in (("gluon", True), ("triton", False)):
        pa.USE_HOPPER_PREFILL = use
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        n, t0 = 200, time.perf_counter()
        for _ in range(n):
            call()
        us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        res["host_us_per_call"][name] = us
        rows.append(f"host time per paged_attention call, 16 prompts x 512, prompt chunks on {name}: {us:.1f} us")
    pa.USE_HOPPER_PREFILL = True
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        call()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(14)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", nargs="*", default=[], choices=["decode", "prefill", "host"])
    p.add_argument("--decode-sweep", action="store_true", help="time tile shapes for decode (first block size)")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64], help="KV page sizes (prefill: the first)")
    p.add_argument("--decode-uniform", type=int, nargs=2, metavar=("SEQS", "CTX"),
                   help="decode SEQS sequences of CTX tokens each instead of the workload's contexts")
    p.add_argument("--decode-configs", nargs="*", default=[], type=lambda v: tuple(map(int, v.split(","))),
                   metavar="BN,W,ST", help="extra decode tiles to time beside the default (block_n,warps,stages)")
    p.add_argument("--gluon-decode-stages", type=int, nargs="*", default=[2],
                   help="fp8 decode: ring depths to time spool.kernels.decode_hopper at (Hopper, block >= 64)")
    p.add_argument("--graphs", action="store_true", help="decode: time CUDA graph replays (GPU time, no host cost)")
    p.add_argument("--decode-top", type=int, default=4, help="decode rows printed beside the default, fastest first")
    p.add_argument("--warp-specialize", action="store_true",
                   help="also time the default tiles with warp-specialized KV loops (AttnConfig.warp_specialize)")
    p.add_argument("--quick", action="store_true",
                   help="prefill: of the Triton kernel's tiles, the default and TMA 128x128 only")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/attn_workload.py needs a CUDA GPU", file=sys.stderr)
        return 2
    res: dict = {"device": torch.cuda.get_device_name()}
    rows: list[str] = []
    if "decode" not in a.skip:
        decode_section(a, res, rows)
    if "prefill" not in a.skip:
        prefill_section(a, res, rows)
    if "host" not in a.skip:
        host_section(a, res, rows)
    print("\n".join(rows))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
