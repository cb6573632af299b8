"""bench/kernel_speeds.py's fp8quant group: per-token FP8 activation quantization, torch vs Triton vs fused producers.

For each T x K: the torch path (spool.kernels.reference: inf-norm, two divisions, cast: several passes over x), the
one-pass Triton kernel (spool.kernels.fp8_quant), and the two producers the decoder fuses it into, each three ways:
torch ops, Triton op + Triton quantize (unfused), and the fused *_quant kernel. K is the normed width for
add+norm+quant and d (half the gate|up width) for silu+quant.

GB/s counts the bytes the fused op must move (inputs read once, outputs written once) for all three forms of a
case, so the figures compare directly: quantize T*K*(esz + 1); add+norm+quant T*K*(3*esz + 1) (x, residual in;
residual', q out); silu+quant T*K*(2*esz + 1); plus 4 bytes of scale per row. Inputs are not rotated: at
T=512, K=4096 they fit in L2 (as a decode step's activations do). Each (T, K) also checks the claims once:
the kernel's codes and scales equal the torch path's, and each fused op's equal its unfused form's
(results "T{t}_K{k}_exact").
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def fp8_quant_section(dev: str, dtype: torch.dtype, tokens: list[int], widths: list[int], rows: list,
                      results: dict, bench: Callable, rep: int) -> None:
    """Time every case at every (T, K); append table rows and fill results["fp8_quant"]["T{t}_K{k}"]."""
    from spool.kernels import reference
    from spool.kernels.fp8_quant import quantize_per_token_fp8
    from spool.kernels.triton_ops import TRITON_OPS as T

    esz = torch.tensor([], dtype=dtype).element_size()
    out = results.setdefault("fp8_quant", {})
    for t in tokens:
        for k in widths:
            x = torch.randn(t, k, device=dev, dtype=dtype)
            r = torch.randn(t, k, device=dev, dtype=dtype)
            w = torch.randn(k, device=dev, dtype=dtype)
            g = torch.randn(t, 2 * k, device=dev, dtype=dtype)
            scales = 4 * t
            cases = {  # name: (fn, bytes moved)
                "quant torch": (lambda: reference.quantize_per_token_fp8(x), t * k * (esz + 1) + scales),
                "quant triton": (lambda: quantize_per_token_fp8(x), t * k * (esz + 1) + scales),
                "add+norm+quant torch": (lambda: reference.fused_add_rms_norm_quant(x, r, w, 1e-5),
                                         t * k * (3 * esz + 1) + scales),
                "add+norm+quant unfused": (lambda: quantize_per_token_fp8(T.fused_add_rms_norm(x, r, w, 1e-5)[0]),
                                           t * k * (3 * esz + 1) + scales),
                "add+norm+quant fused": (lambda: T.fused_add_rms_norm_quant(x, r, w, 1e-5),
                                         t * k * (3 * esz + 1) + scales),
                "silu+quant torch": (lambda: reference.silu_and_mul_quant(g), t * k * (2 * esz + 1) + scales),
                "silu+quant unfused": (lambda: quantize_per_token_fp8(T.silu_and_mul(g)),
                                       t * k * (2 * esz + 1) + scales),
                "silu+quant fused": (lambda: T.silu_and_mul_quant(g), t * k * (2 * esz + 1) + scales),
            }
            same = {"quant triton": _same(cases["quant triton"][0](), cases["quant torch"][0]()),
                    "add+norm+quant fused": _same(cases["add+norm+quant fused"][0]()[0],
                                                  cases["add+norm+quant unfused"][0]()),
                    "silu+quant fused": _same(cases["silu+quant fused"][0](), cases["silu+quant unfused"][0]())}
            out[f"T{t}_K{k}_exact"] = same
            timed = out[f"T{t}_K{k}"] = {}
            for name, (fn, nbytes) in cases.items():
                ms = bench(fn, rep)
                timed[name] = {"ms": ms, "GB/s": nbytes / ms / 1e6}
            for name, v in timed.items():
                base = timed[name.rsplit(" ", 1)[0] + " torch"]["ms"]
                note = "" if name.endswith("torch") else f"x{base / v['ms']:.2f} vs torch"
                if name.endswith("fused") and not name.endswith("unfused"):
                    note += f", x{timed[name.replace('fused', 'unfused')]['ms'] / v['ms']:.2f} vs unfused"
                if name in same:
                    versus = "torch" if name == "quant triton" else "unfused"
                    note += f"; {'bit-exact' if same[name] else 'NOT bit-exact'} vs {versus}"
                rows.append((f"fp8 {name} [{t}x{k}]", v["ms"], v["GB/s"], note))
            del x, r, w, g


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Equal e4m3 codes and float32 scales."""
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])
