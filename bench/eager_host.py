"""Host (Python) time of the eager forward pass per decoder layer, with every Triton launch stubbed out.

  .venv/bin/python bench/eager_host.py                  # a tiny Qwen3, a mixed step (2 prompt chunks, 14 decodes)
  .venv/bin/python bench/eager_host.py --arch llama --profile 25

Eager steps (prompt and mixed steps above the piecewise graphs' size, spool/engine/piecewise_graphs.py, or every one
with piecewise_graph_tokens=0; decode-only steps replay CUDA graphs) pay each layer's op wrappers (argument
checks, output allocation, launch-size arithmetic) and torch's module calls on the host every step. When that
host time exceeds the GPU's time for the step, the GPU waits; the engine measures both at start-up. This
measures the host time without a GPU: a tiny random model of the architecture runs the Triton backend's Python
with each kernel's launch replaced by a no-op that only counts (the GEMMs still run, tiny, on the CPU).
Triton's own launch cost (JITFunction.run) and the CUDA driver's are not included; `--device cuda` adds them:
the same forward with the real launches, whose extra time per launch is Triton's launch path on that host.
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

KERNEL_MODULES = tuple(f"spool.kernels.{m}" for m in ("rms_norm", "activation", "rotary", "qk_norm_rotary", "kv_cache",
                                                       "paged_attention", "fp8_quant"))


class _CountingLaunch:
    """Stands in for a @triton.jit function: kernel[grid](...) counts the launch and does nothing."""

    def __init__(self, name: str, counts: Counter):
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.counts[self.name] += 1
        return launch


@contextmanager
def stubbed_launches() -> Iterator[Counter]:
    """Inside: every Triton kernel of the backend's modules is a counting no-op (the counter is yielded)."""
    counts: Counter = Counter()
    originals = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name in dir(module):
            kernel = getattr(module, name)
            if isinstance(kernel, (JITFunction, InterpretedFunction)):
                originals.append((module, name, kernel))
                setattr(module, name, _CountingLaunch(name, counts))
    try:
        yield counts
    finally:
        for module, name, kernel in originals:
            setattr(module, name, kernel)


def measure(arch: str = "qwen3", steps: int = 300, profile: int = 0, device: str = "cpu") -> dict:
    """Host µs per layer of one mixed step's eager forward (the fastest of five rounds of steps / 5 forwards), and
    the Triton launches per forward by kernel. On CUDA it also runs the real launches: the difference is Triton's
    own launch path (JITFunction.run and the driver), given per launch."""
    from spool.engine import LLM
    from spool.testing.tiny_model import build_tiny_model

    path = build_tiny_model(Path(tempfile.mkdtemp()), arch, False)
    llm = LLM(str(path), device=device, kernel_backend="triton", block_size=16, num_kv_blocks=64)
    with stubbed_launches() as counts:
        res = _measure(llm, counts, arch, steps, profile)
    if device != "cpu":
        real = _measure(llm, Counter(), arch, steps, 0)["us_per_layer"]
        per_layer = sum(res["launches_per_forward"].values()) / res["layers"]
        res.update(real_us_per_layer=real, triton_us_per_launch=round((real - res["us_per_layer"]) / per_layer, 1))
    return res


def _measure(llm, counts: Counter, arch: str, steps: int, profile: int) -> dict:
    runner = llm.engine.runner
    layers = len(runner.model.layers)
    chunks = [[5] * 8, [6] * 8] + [[7]] * 14  # two prompt chunks beside fourteen decodes
    meta = runner._metadata(chunks, [0, 0] + [3] * 14, [[i] for i in range(16)], list(range(16)))

    def forward() -> None:
        with torch.inference_mode():
            runner.model(meta, runner.kv_caches, runner.cos_sin)

    for _ in range(20):
        forward()
    counts.clear()
    forward()
    launches = dict(counts)
    rounds, per_round = [], max(1, steps // 5)  # the fastest of five rounds: a shared machine's noise only adds time
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(per_round):
            forward()
        if runner.device.type == "cuda":
            torch.cuda.synchronize()  # a tiny model's kernels take less than their host time: this waits little
        rounds.append((time.perf_counter() - t0) / per_round)
    us_per_layer = 1e6 * min(rounds) / layers
    attn_us = _attention_us_per_layer(runner, meta, per_round)
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            forward()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(profile)
    return {"arch": arch, "layers": layers, "us_per_layer": round(us_per_layer, 1),
            "attention_us_per_layer": round(attn_us, 1), "launches_per_forward": launches}


def _attention_us_per_layer(runner, meta, per_round: int) -> float:
    """Host µs per layer of attention alone (Attention.attend into a given output): what a piecewise-graph step
    (spool/engine/piecewise_graphs.py) still runs eagerly per layer, beside its graph replays."""
    attn = runner.model.layers[0].self_attn
    t = meta.num_tokens
    q = torch.zeros(t, attn.num_heads, attn.head_dim, dtype=runner.dtype, device=runner.device)
    k = torch.zeros(t, attn.num_kv_heads, attn.head_dim, dtype=runner.dtype, device=runner.device)
    o = torch.empty_like(q)
    layers = [(layer.self_attn, kv) for layer, kv in zip(runner.model.layers, runner.kv_caches)]
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(per_round):
            for a, kv in layers:
                a.attend(q, k, k, meta, kv, out=o)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / per_round)
    return 1e6 * min(rounds) / len(layers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["llama", "qwen2", "qwen3", "mistral"], default="qwen3")
    p.add_argument("--steps", type=int, default=300, help="timed forward passes")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also print the top N cProfile functions")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda: also time the real launches, to get Triton's launch cost per launch")
    args = p.parse_args()
    torch.set_num_threads(1)
    res = measure(args.arch, args.steps, args.profile, args.device)
    print(f"{res['arch']}: {res['us_per_layer']} us of host time per layer (eager mixed step, launches stubbed); "
          f"Triton launches per forward ({res['layers']} layers): {res['launches_per_forward']}")
    print(f"attention alone (what a piecewise-graph step runs eagerly per layer): {res['attention_us_per_layer']} "
          "us per layer")
    if "real_us_per_layer" in res:
        print(f"with the real launches: {res['real_us_per_layer']} us per layer, so Triton's launch path costs "
              f"{res['triton_us_per_launch']} us per launch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
