"""A decode step's GEMMs by row count: what a few rows past a round batch cost (bf16 and fp8 W8A8).

Why: a bulk batch runs max_num_seqs (512) rows; an interactive request beside it adds a row, and the step then
replays the next decode graph (528 rows). cuBLAS tiles M in 64-256 row blocks, so 513-528 rows may cost a whole
extra tile row of every GEMM. This times the model's per-layer linears (fused qkv, o, fused gate|up, down) and
the LM head at each row count, as one step's worth (layers x per-layer + LM head), through the engine's own
paths (F.linear; spool.engine.quantization.fp8.fp8_linear with per-token activation quantization for fp8).

    python bench/gemm_rows.py --shape llama3-8b --rows 496 512 513 520 528 544 576 640 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.shapes import SHAPES  # noqa: E402


def _linears(cfg: dict) -> dict[str, tuple[int, int]]:
    """name: (out, in) of one decoder layer's fused linears, plus the LM head."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i),
            "lm_head": (cfg["vocab_size"], h)}


def _time_ms(fn, iters: int) -> float:
    """ms per call: `iters` calls captured in one CUDA graph (no host time in the figure), median of 5 replays."""
    fn()  # cuBLAS picks and loads its kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) / iters)
    del graph
    return sorted(rounds)[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[496, 512, 513, 520, 528, 544, 576, 640])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3,
                    help="passes over the row counts, alternately up and down (clocks drift under load); medians")
    ap.add_argument("--blas", choices=["default", "cublas", "cublaslt"], default="default",
                    help="torch.backends.cuda.preferred_blas_library for the bf16 GEMMs")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gemm_rows.py needs a CUDA GPU")
    from spool.engine.quantization.fp8 import fp8_linear
    from spool.kernels.fp8 import FP8_DTYPE

    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    cfg = SHAPES[args.shape]
    layers = cfg["num_hidden_layers"]
    dev = torch.device("cuda")
    results: dict = {"shape": args.shape, "device": torch.cuda.get_device_name(dev), "rows": args.rows,
                     "blas": args.blas, "repeat": args.repeat}
    for dt in args.dtypes:
        weights = {}
        for name, (n_out, n_in) in _linears(cfg).items():
            w = torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16) * 0.02
            if dt == "fp8" and name != "lm_head":  # the engine keeps the LM head in bf16
                scale = w.abs().amax(1).float().clamp(min=1e-12) / 448.0
                weights[name] = ((w / scale[:, None].to(w.dtype)).to(FP8_DTYPE), scale)
            else:
                weights[name] = (w, None)
        print(f"\n{args.shape} {dt}: ms per step (x{layers} layers + LM head) and per GEMM, medians of {args.repeat}")
        samples: dict[int, dict[str, list[float]]] = {m: {} for m in args.rows}
        for rep in range(args.repeat):
            for m in (args.rows if rep % 2 == 0 else args.rows[::-1]):
                x_h = torch.randn(m, cfg["hidden_size"], device=dev, dtype=torch.bfloat16)
                x_i = torch.randn(m, cfg["intermediate_size"], device=dev, dtype=torch.bfloat16)
                for name, (w, scale) in weights.items():
                    x = x_i if name == "down" else x_h
                    if scale is None:
                        t = _time_ms(lambda x=x, w=w: F.linear(x, w), args.iters)
                    else:
                        t = _time_ms(lambda x=x, w=w, s=scale: fp8_linear(x, w, s), args.iters)
                    samples[m].setdefault(name, []).append(t)
        table = {}
        for m in args.rows:
            per = {name: sorted(ts)[len(ts) // 2] for name, ts in samples[m].items()}
            step = layers * sum(v for k, v in per.items() if k != "lm_head") + per["lm_head"]
            table[m] = {"step_ms": round(step, 3), **{f"{k}_us": round(v * 1e3, 1) for k, v in per.items()}}
            print(f"  M={m:5d}  step {step:7.3f} ms  " + "  ".join(f"{k} {v * 1e3:7.1f} us" for k, v in per.items()))
        base = table.get(512)
        if base:
            for m, r in table.items():
                r["vs_512"] = round(r["step_ms"] / base["step_ms"], 4)
            print("  vs 512 rows: " + ", ".join(f"{m}: x{r['vs_512']:.3f}" for m, r in table.items()))
        results[dt] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
